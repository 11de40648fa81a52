"""backend.memory_management: nothing to move on a CPU test host; Neo's load_models_gpu signature, calls recorded."""
from __future__ import annotations

import torch

calls: list[dict] = []


def load_model_gpu(model) -> None:
    load_models_gpu([model])


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False) -> None:
    calls.append({"models": list(models), "force_full_load": force_full_load,
                  "inference_mode": torch.is_inference_mode_enabled()})


def unload_all_models() -> None:
    pass


def soft_empty_cache(force: bool = False) -> None:
    pass
