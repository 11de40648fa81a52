"""The positive adapter phi^p as a standard LoRA file (kohya's format), which the webui's built-in Lora, ComfyUI
and kohya's tools load: ``lora_unet_<layer>`` / ``lora_te_<layer>`` keys (the diffusers module path with "_"),
each with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``, and ``ss_*`` metadata. SDXL's two text
encoders are ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (OpenCLIP-G), as kohya names them.

Only phi^p is exported: phi^n belongs on the negative branch of CFG, and an ordinary LoRA applies to both
branches, which is exactly wrong for it.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import InputError

PREFIXES = {"unet_pos": "lora_unet_", "te_pos": "lora_te_"}
BASE_MODELS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
TEXT_ENCODER_PREFIXES = {"clip_l.": "lora_te1_", "clip_g.": "lora_te2_"}  # SDXL's canonical names -> kohya's


def _kohya_module(prefix: str, layer: str) -> str:
    """kohya's module name of a canonical layer name ("." as "_"); SDXL's text layers name their encoder."""
    for encoder, kohya in TEXT_ENCODER_PREFIXES.items():
        if prefix == PREFIXES["te_pos"] and layer.startswith(encoder):
            return kohya + layer.removeprefix(encoder).replace(".", "_")
    return prefix + layer.replace(".", "_")


def kohya_lora(groups: Mapping[str, Mapping[str, torch.Tensor]], family: str,
               name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of phi^p from a pair's adapter groups ("unet_pos", "te_pos": "<layer>.lora_down|up")."""
    if not any(group in groups for group in PREFIXES):
        raise InputError(f"{name} has no positive adapter to export; train it with adapters on.")
    tensors, ranks = {}, []
    for group, prefix in PREFIXES.items():
        for key, tensor in groups.get(group, {}).items():
            layer, part = key.rsplit(".", 1)
            module = _kohya_module(prefix, layer)
            tensors[f"{module}.{part}.weight"] = tensor.float().contiguous()
            if part == "lora_down":
                tensors[f"{module}.alpha"] = torch.tensor(float(tensor.shape[0]))  # alpha = rank: scale 1
                ranks.append(tensor.shape[0])
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": str(max(ranks)),
        "ss_base_model_version": BASE_MODELS.get(family, family),
        "ss_v2": str(family == "sd2"),
        "ss_output_name": f"{name}-pos",
        "ss_training_comment": f"DreamArtist++ positive adapter of the pair {name} / {name}-neg; use it with the "
                               f"embedding {name} in the prompt.",
    }
    return tensors, metadata
