// DreamArtist tab: attach the webui's progress bar to a training run (the built-in Train tab's pattern).

function dreamartist_task_id() {
    var random = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
    return "task(dreamartist-" + random + ")";
}

// The content element of a gr.HTML block (gradio 3 and 4 both render it as .prose inside the block).
function dreamartist_html_body(block) {
    return block.querySelector(".prose") || block;
}

// Called by a Train button before the request; returns the arguments with the task id in place of the first.
// ``prefix`` names the side of the tab: "dreamartist_" (pair) or "dreamartist_identity_".
function dreamartist_start(prefix, args) {
    var app = gradioApp();
    var result = app.querySelector("#" + prefix + "result");
    var status = dreamartist_html_body(app.querySelector("#" + prefix + "progress"));
    var id = dreamartist_task_id();
    // Fade the previous result rather than empty it: gradio would not redraw an identical new one.
    result.classList.add("dreamartist-stale");
    requestProgress(id, result, app.querySelector("#" + prefix + "gallery"),
        function() {
            result.classList.remove("dreamartist-stale");
            status.textContent = "";  // the result line now says how far it got
        },
        function(progress) {
            status.textContent = progress.textinfo || "";
        });
    args[0] = id;
    return args;
}

function dreamartist_start_training() {
    return dreamartist_start("dreamartist_", Array.from(arguments));
}

function dreamartist_start_identity_training() {
    return dreamartist_start("dreamartist_identity_", Array.from(arguments));
}
