// DreamArtist tab: attach the webui's progress bar to a training run (the built-in Train tab's pattern).

function dreamartist_task_id() {
    var random = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
    return "task(dreamartist-" + random + ")";
}

// The content element of a gr.HTML block (gradio 3 and 4 both render it as .prose inside the block).
function dreamartist_html_body(block) {
    return block.querySelector(".prose") || block;
}

// Called by the Train button before the request; returns the arguments with the task id in place of the first.
function dreamartist_start_training() {
    var app = gradioApp();
    var result = app.querySelector("#dreamartist_result");
    var status = dreamartist_html_body(app.querySelector("#dreamartist_progress"));
    var id = dreamartist_task_id();
    // Fade the previous result rather than empty it: gradio would not redraw an identical new one.
    result.classList.add("dreamartist-stale");
    requestProgress(id, result, app.querySelector("#dreamartist_gallery"),
        function() {
            result.classList.remove("dreamartist-stale");
            status.textContent = "";  // the result line now says how far it got
        },
        function(progress) {
            status.textContent = progress.textinfo || "";
        });
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}
