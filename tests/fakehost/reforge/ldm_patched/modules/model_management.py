"""reForge's ldm_patched memory manager: load_models_gpu loads patchers (and unloads loaded clones of their models,
taking their patches out). This host has no GPU; a move to the device is modelled as what it does to the weights:
each parameter becomes a new tensor, made in the grad mode of the caller, so a generation (torch.inference_mode)
leaves inference tensors in the model, as a real move or LoRA patch during a generation does."""
from __future__ import annotations

import torch

current_loaded_models: list = []  # loaded patchers, newest first
_on_device: set[int] = set()  # ids of the models whose weights were "moved to the device"
calls: list[dict] = []  # what each load was asked (tests read it)


def _move_to_device(model: torch.nn.Module) -> None:
    if id(model) in _on_device:
        return
    _on_device.add(id(model))
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(param.detach().clone(),
                                                                  requires_grad=param.requires_grad)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    calls.append({"models": list(models), "inference_mode": torch.is_inference_mode_enabled(),
                  "force_full_load": force_full_load})
    for patcher in models:
        if any(loaded is patcher for loaded in current_loaded_models):
            continue
        for loaded in [m for m in current_loaded_models if patcher.is_clone(m)]:
            loaded.unpatch_model()
            current_loaded_models.remove(loaded)
        _move_to_device(patcher.model)
        patcher.patch_model()
        current_loaded_models.insert(0, patcher)


def load_model_gpu(model) -> None:
    load_models_gpu([model])
