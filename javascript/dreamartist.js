// DreamArtist tab: attach the webui's progress bar to a training run (the built-in Train tab's pattern).

function dreamartist_task_id() {
    var random = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
    return "task(dreamartist-" + random + ")";
}

// Called by the Train button before the request; returns the arguments with the task id in place of the first.
function dreamartist_start_training() {
    var app = gradioApp();
    var result = app.querySelector("#dreamartist_result");
    result.querySelector(".prose, div").innerHTML = "";
    var status = app.querySelector("#dreamartist_progress");
    var id = dreamartist_task_id();
    requestProgress(id, result, app.getElementById("dreamartist_gallery"),
        function() {},
        function(progress) {
            status.textContent = progress.textinfo || "";
        });
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}
