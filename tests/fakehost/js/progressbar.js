// Stand-in for the webui's progressbar.js, written from its documented behaviour:
// requestProgress(id_task, progressbarContainer, gallery, atEnd, onProgress, inactivityTimeout) inserts a
// progress bar before progressbarContainer, polls ./internal/progress, shows live previews in gallery,
// passes every response to onProgress, and ends (calling atEnd, which must be a function) when the task
// completed, went inactive, or a request failed.

function requestProgress(id_task, progressbarContainer, gallery, atEnd, onProgress, inactivityTimeout) {
    inactivityTimeout = inactivityTimeout || 40;
    var period = (typeof opts !== "undefined" && opts.live_preview_refresh_period) || 500;
    var started = Date.now();
    var wasActive = false;

    var bar = document.createElement("div");
    bar.className = "progressDiv";
    var inner = document.createElement("div");
    inner.className = "progress";
    inner.style.width = "0%";
    bar.appendChild(inner);
    progressbarContainer.parentNode.insertBefore(bar, progressbarContainer);

    var preview = null;  // created in gallery when the first live preview arrives
    var finished = false;

    function finish() {
        if (finished) return;
        finished = true;
        bar.remove();
        if (preview) preview.remove();
        atEnd();
    }

    var idLivePreview = -1;
    function poll() {
        if (finished) return;
        fetch("./internal/progress", {
            method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({id_task: id_task, id_live_preview: idLivePreview, live_preview: true}),
        }).then(function(r) {
            if (!r.ok) throw new Error("progress request failed: " + r.status);
            return r.json();
        }).then(function(res) {
            if (res.completed) { finish(); return; }
            wasActive = wasActive || res.active;
            var timedOut = !res.queued && Date.now() - started > inactivityTimeout * 1000;
            if (!res.active && (wasActive || timedOut)) { finish(); return; }
            var percent = Math.round((res.progress || 0) * 100);
            inner.style.width = percent + "%";
            var text = res.progress > 0 ? percent + "%" : "";
            if (res.textinfo && res.textinfo.indexOf("\n") === -1) text = res.textinfo + " " + text;
            inner.textContent = text;
            if (gallery && res.live_preview) {
                if (!preview) {
                    preview = document.createElement("div");
                    preview.className = "livePreview";
                    gallery.insertBefore(preview, gallery.firstChild);
                }
                var img = document.createElement("img");
                img.src = res.live_preview;
                preview.replaceChildren(img);
                idLivePreview = res.id_live_preview;
            }
            if (onProgress) onProgress(res);
            setTimeout(poll, period);
        }).catch(finish);
    }
    poll();
}
