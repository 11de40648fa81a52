"""A test-only webui extension: records, for each call of one UNet adapter layer and one text-encoder adapter
layer, the row labels DreamArtist's adapters saw (which adapter acted on which row), behind a small HTTP API.

    POST /dreamartist-probe/v1/watch   hook the loaded model's first UNet and text-encoder adapter layers; forget
    GET  /dreamartist-probe/v1/rows    {"unet": [[labels per row] per call], "te": [...]}, ids without their tag
    POST /dreamartist-probe/v1/unwatch remove the hooks
"""
from modules import script_callbacks, shared

_records = {"unet": [], "te": []}
_handles = []


def _hook(part):
    def record(module, inputs, output):
        from dreamartist.adapters import current_rows

        rows = current_rows()
        _records[part].append(None if rows is None else [
            sorted(label.split("@")[0] for label in (row if not isinstance(row, str) else {row} - {""}))
            for row in rows])
    return record


def watch():
    from extensions_builtin_compat.host_backend import layers_of

    unwatch()
    for part, layers in layers_of(shared.sd_model).items():
        _handles.append(next(iter(layers.values())).register_forward_hook(_hook(part)))
    return {"watching": len(_handles)}


def unwatch():
    while _handles:
        _handles.pop().remove()
    for calls in _records.values():
        calls.clear()
    return {"watching": 0}


def rows():
    return _records


def on_app_started(demo, app):
    app.add_api_route("/dreamartist-probe/v1/watch", watch, methods=["POST"])
    app.add_api_route("/dreamartist-probe/v1/unwatch", unwatch, methods=["POST"])
    app.add_api_route("/dreamartist-probe/v1/rows", rows, methods=["GET"])


script_callbacks.on_app_started(on_app_started)
