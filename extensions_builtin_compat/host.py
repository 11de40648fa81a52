"""What the running webui can do, found by probing attributes and modules, never by version strings."""
from __future__ import annotations

import importlib
import importlib.util

import torch
from modules import shared


def is_forge() -> bool:
    """Forge (any generation) ships the modules_forge package; A1111 does not."""
    return importlib.util.find_spec("modules_forge") is not None


def sd_hijack():
    """The webui's modules.sd_hijack, or None where the host has none (Forge Neo dropped it)."""
    try:
        return importlib.import_module("modules.sd_hijack")
    except ImportError:
        return None


def embedding_db():
    """A1111's (and reForge's) model_hijack.embedding_db, or None: original Forge's hijack is a stub without one,
    and Forge Neo has no hijack at all (its embeddings live in each text engine)."""
    return getattr(getattr(sd_hijack(), "model_hijack", None), "embedding_db", None)


def has_embedding_db() -> bool:
    return embedding_db() is not None


def _is_model(model) -> bool:
    """Whether ``model`` is a real model: Forge Neo holds a placeholder without any model part (cond_stage_model
    None, no forge_objects) until its first generation loads one, and again after "unload"."""
    return any(getattr(model, part, None) is not None for part in ("forge_objects", "cond_stage_model",
                                                                   "conditioner", "model"))


def runs_webui_modules(model) -> bool:
    """Whether generation runs ``model``'s own ldm/sgm modules, where the PN adapters hook in. The Forge family
    (Classic, reForge, Neo) samples through its backend's patchers instead: the adapters are off there."""
    return getattr(model, "forge_objects", None) is None


def loaded_model():
    """The loaded model, or None; unlike shared.sd_model this never starts loading one."""
    sd_models = importlib.import_module("modules.sd_models")
    model_data = getattr(sd_models, "model_data", None)
    model = getattr(model_data, "sd_model", None) if model_data is not None else shared.sd_model
    return model if model is not None and _is_model(model) else None


def host_unsupported_reason() -> str | None:
    """Why this webui cannot train at all, in one sentence; None when it can."""
    if is_forge():
        return ("Training in Forge is not supported yet (Forge runs the model through its own backend, which this "
                "trainer does not drive); train with the command line (python -m dreamartist train --ckpt <the same "
                f"checkpoint>) and copy the pair into {shared.cmd_opts.embeddings_dir}: pairs work in Forge's prompts.")
    if not has_embedding_db():
        return "This webui has no textual-inversion embeddings, so pairs cannot be trained or used here."
    return None


def model_unsupported_reason(model) -> str | None:
    """Why ``model`` cannot be trained on, in one sentence; None when it can."""
    if model is None:
        return "No Stable Diffusion model is loaded; choose a checkpoint at the top of the page first."
    if getattr(model, "forge_objects", None) is not None:
        return host_unsupported_reason() or "This model was loaded by Forge's backend, which cannot be trained."
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        reason = sdxl_unsupported_reason(model)
        if reason:
            return reason
    elif not (getattr(model, "is_sd1", False) or getattr(model, "is_sd2", False)):
        return "Only SD1.x, SD2.x and SDXL checkpoints can be trained on; load one of those."
    if getattr(getattr(model, "model", None), "conditioning_key", "crossattn") != "crossattn":  # wants c_concat/c_adm
        return ("This checkpoint is an inpainting, depth, instruct-pix2pix or unCLIP model, which cannot be "
                "trained on; load a plain SD1.x, SD2.x or SDXL checkpoint.")
    if getattr(model, "lowvram", False):
        return ("Training needs the whole model on the GPU; restart the webui without --lowvram/--medvram "
                "to train.")
    if not hasattr(getattr(model, "cond_stage_model", None), "encode_embedding_init_text"):
        return "The loaded model's text encoder is not the webui's prompt encoder; reload the checkpoint."
    return None


def sdxl_unsupported_reason(model) -> str | None:
    """Why an SDXL-family model cannot be trained on (the refiner, inpainting UNets), or None for the base."""
    embedders = list(getattr(getattr(model, "conditioner", None), "embedders", []))
    keys = [getattr(embedder, "input_key", None) for embedder in embedders]
    if keys.count("txt") != 2 or "aesthetic_score" in keys:
        return ("SDXL refiner checkpoints cannot be trained on: the refiner has no CLIP-L text encoder and only "
                "finishes the base model's images; load the SDXL base checkpoint (or a model made from it).")
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    conv_in = next((m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)), None) if unet is not None else None
    if getattr(model, "is_sdxl_inpaint", False) or (conv_in is not None and conv_in.in_channels != 4):
        return ("SDXL inpainting checkpoints cannot be trained on; load the SDXL base checkpoint (or a model made "
                "from it).")
    return None


def training_unavailable_reason() -> str | None:
    """Why training cannot start now (host, or the model already loaded), or None. Never loads a model."""
    model = loaded_model()
    return host_unsupported_reason() or (None if model is None else model_unsupported_reason(model))
