// Stand-in for the webui's script.js, written from its documented behaviour: the globals extensions use.

function gradioApp() {
    var apps = document.getElementsByTagName("gradio-app");
    var app = apps.length ? apps[0] : document;
    return app.shadowRoot ? app.shadowRoot : app;
}

var uiLoadedCallbacks = [];

function onUiLoaded(callback) {
    uiLoadedCallbacks.push(callback);
}

// Fire the onUiLoaded callbacks once, when the first tab of the app has been rendered.
document.addEventListener("DOMContentLoaded", function() {
    var observer = new MutationObserver(function() {
        if (!gradioApp().querySelector(".tabitem, .tabs")) return;
        observer.disconnect();
        uiLoadedCallbacks.forEach(function(callback) { callback(); });
    });
    observer.observe(document.body, {childList: true, subtree: true});
});
