// Stand-in for the webui's script.js, written from its documented behaviour: the globals extensions use.

// The root extensions query; like the webui's, it also answers getElementById when it is an element.
function gradioApp() {
    var apps = document.getElementsByTagName("gradio-app");
    var app = apps.length ? apps[0] : document;
    if (app !== document) {
        app.getElementById = function(id) { return document.getElementById(id); };
    }
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
