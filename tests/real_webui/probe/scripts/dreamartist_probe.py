"""A test-only webui extension: records, for each call of one UNet adapter layer and one text-encoder adapter
layer, the row labels DreamArtist's adapters saw (which adapter acted on which row), behind a small HTTP API.

    POST /dreamartist-probe/v1/watch   hook the loaded model's first UNet and text-encoder adapter layers; forget
    GET  /dreamartist-probe/v1/rows    {"unet": [[labels per row] per call], "te": [...], "chunks": [the branch
                                       of each chunk of each UNet call (0 cond, 1 uncond) as the Forge family's
                                       sampler names them in its transformer_options; None on A1111]}, ids without
                                       their tag
    POST /dreamartist-probe/v1/unwatch remove the hooks
    GET  /dreamartist-probe/v1/identity {"calls": [{"t": [...], "split": [bool per row], "keys": [float per row]}]}:
                                       per UNet call, its timesteps and, at the first cross-attention, whether each
                                       row's values came from another context than its keys, and a sum of its keys'
                                       context (the same stage variant gives the same sum)
    GET  /dreamartist-probe/v1/model   the loaded model as a fingerprint: per parameter and buffer a hash of its
                                       values with its dtype, strides and requires_grad; per module its hooks, an
                                       instance forward and its plain attributes; the attention forwards the
                                       webui's optimisations set on ldm's and sgm's classes
    GET  /dreamartist-probe/v1/tensors {"bytes": ..., "largest": [[bytes, tensor] ...], "with_grad_fn": n}: after a
                                       collection, the tensors Python reaches that are not the loaded model's
                                       parameters or buffers (storages counted once), and how many hold a graph
"""
import hashlib

from modules import script_callbacks, shared

_records = {"unet": [], "te": [], "identity": [], "chunks": []}
_handles = []


def _hook(part):
    def record(module, inputs, output):
        from dreamartist.adapters import current_rows

        rows = current_rows()
        _records[part].append(None if rows is None else [
            sorted(label.split("@")[0] for label in (row if not isinstance(row, str) else {row} - {""}))
            for row in rows])
    return record


def _unet_call(module, args, kwargs):
    t = args[1] if len(args) > 1 else kwargs.get("timesteps")
    _records["identity"].append({"t": [float(x) for x in t.reshape(-1)], "k": None, "v": None})
    _records["chunks"].append((kwargs.get("transformer_options") or {}).get("cond_or_uncond"))


def _context(which):
    def record(module, inputs, output):
        if _records["identity"] and _records["identity"][-1][which] is None:
            _records["identity"][-1][which] = inputs[0].detach().float().cpu()
    return record


def watch():
    from extensions_builtin_compat.host_attention import attention_layers
    from extensions_builtin_compat.host_backend import layers_of, unet_of

    unwatch()
    for part, layers in layers_of(shared.sd_model).items():
        _handles.append(next(iter(layers.values())).register_forward_hook(_hook(part)))
    unet = unet_of(shared.sd_model)
    _handles.append(unet.register_forward_pre_hook(_unet_call, with_kwargs=True))
    attn2 = next((m for name, m in attention_layers(unet).items() if name.endswith("attn2")), None)
    if attn2 is not None:  # the webui's own ldm attention (identities)
        _handles.extend([attn2.to_k.register_forward_hook(_context("k")),
                         attn2.to_v.register_forward_hook(_context("v"))])
    return {"watching": len(_handles)}


def unwatch():
    while _handles:
        _handles.pop().remove()
    for calls in _records.values():
        calls.clear()
    return {"watching": 0}


def rows():
    return {part: _records[part] for part in ("unet", "te", "chunks")}


def identity():
    calls = []
    for call in _records["identity"]:
        k, v = call["k"], call["v"]
        if k is None or v is None:
            continue
        calls.append({"t": call["t"], "split": [bool((k[r] != v[r]).any()) for r in range(k.shape[0])],
                      "keys": [float(k[r].double().sum()) for r in range(k.shape[0])]})
    return {"calls": calls}


def model():
    import importlib

    import torch

    found, sd_model = {}, shared.sd_model
    for kind, named in (("parameter", sd_model.named_parameters()), ("buffer", sd_model.named_buffers())):
        for name, tensor in named:
            data = tensor.detach().cpu()
            data = data.float() if data.dtype == torch.bfloat16 else data  # numpy has no bfloat16; exact in float32
            digest = hashlib.sha1(data.contiguous().numpy().tobytes()).hexdigest()
            found[f"{kind} {name}"] = [digest, str(tensor.dtype), list(tensor.stride()), tensor.requires_grad]
    for name, module in sd_model.named_modules():
        plain = {k: repr(v)[:80] for k, v in vars(module).items() if not k.startswith("_")
                 and not isinstance(v, (torch.Tensor, torch.nn.Module))}
        found[f"module {name}"] = {**plain, "hooks": [len(module._forward_hooks), len(module._forward_pre_hooks)]}
    forwards = {}
    for package in ("ldm", "sgm"):  # not in every Forge-family host
        try:
            forwards[package] = repr(importlib.import_module(f"{package}.modules.attention").CrossAttention.forward)
        except (ImportError, AttributeError):
            pass
    found["attention forwards"] = forwards
    return found


def tensors():
    import gc

    import torch

    gc.collect()
    sd_model = shared.sd_model
    if isinstance(sd_model, torch.nn.Module):
        parts = [sd_model]
    else:  # Forge Neo's model object holds its parts in its patchers
        objects = sd_model.forge_objects
        parts = [objects.unet.model, objects.clip.cond_stage_model, objects.vae.first_stage_model]
    owned = {t.untyped_storage().data_ptr() for part in parts for t in [*part.parameters(), *part.buffers()]}
    seen, largest, graphs = set(), [], 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
            continue
        graphs += obj.grad_fn is not None
        storage = obj.untyped_storage()
        if storage.data_ptr() in owned or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        largest.append([storage.nbytes(), f"{tuple(obj.shape)} {obj.dtype} requires_grad={obj.requires_grad}"])
    largest.sort(reverse=True)
    return {"bytes": sum(n for n, _ in largest), "largest": largest[:4], "with_grad_fn": graphs}


def on_app_started(demo, app):
    app.add_api_route("/dreamartist-probe/v1/model", model, methods=["GET"])
    app.add_api_route("/dreamartist-probe/v1/watch", watch, methods=["POST"])
    app.add_api_route("/dreamartist-probe/v1/unwatch", unwatch, methods=["POST"])
    app.add_api_route("/dreamartist-probe/v1/rows", rows, methods=["GET"])
    app.add_api_route("/dreamartist-probe/v1/identity", identity, methods=["GET"])
    app.add_api_route("/dreamartist-probe/v1/tensors", tensors, methods=["GET"])


script_callbacks.on_app_started(on_app_started)
