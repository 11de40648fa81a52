"""What the running webui can do, found by probing attributes and modules, never by version strings."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import re

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


def loaded_model():
    """The loaded model, or None; unlike shared.sd_model this never starts loading one."""
    sd_models = importlib.import_module("modules.sd_models")
    model_data = getattr(sd_models, "model_data", None)
    model = getattr(model_data, "sd_model", None) if model_data is not None else shared.sd_model
    return model if model is not None and _is_model(model) else None


def host_unsupported_reason() -> str | None:
    """Why this webui cannot train at all, in one sentence; None when it can: A1111, and the Forge family (reForge and
    Forge Classic on the webui's model object, Forge Neo and original Forge through their backend's text engines)."""
    if not has_embedding_db() and not is_forge():
        return "This webui has no textual-inversion embeddings, so pairs cannot be trained or used here."
    return None


TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def text_engines(model) -> list:
    """The text engines of a model Forge's own backend loaded (one for SD1, CLIP-L's and CLIP-G's for SDXL), in the
    order their outputs are concatenated; none on other models."""
    return [engine for name in TEXT_ENGINES if (engine := getattr(model, name, None)) is not None]


def runs_forge_engine(model) -> bool:
    """Whether ``model`` is one Forge's own backend loaded (Forge Neo, original Forge): its prompts go through the
    backend's text engines and there is no webui model object around its UNet."""
    return getattr(getattr(model, "model", None), "diffusion_model", None) is None and bool(text_engines(model))


def adds_residuals_in_place(block: torch.nn.Module) -> bool:
    """Whether a transformer block adds its residual in place onto a tensor its norm has just read (Forge Classic's
    ldm_patched: ``n = self.norm1(x) ... x += n``), which a backward pass cannot go through as it is; A1111's and
    reForge's add out of place. Read from the block's own code, the one place this shows."""
    return type(block).__name__ == "BasicTransformerBlock" and _inplace_source(type(block))


@functools.cache
def _inplace_source(block_class: type) -> bool:
    try:
        source = inspect.getsource(block_class)
    except (OSError, TypeError):  # no source to read: assume the common, out-of-place form
        return False
    return re.search(r"\bx\s*\+=\s*n\b", source) is not None


def model_unsupported_reason(model) -> str | None:
    """Why ``model`` cannot be trained on, in one sentence; None when it can."""
    if model is None:
        return "No Stable Diffusion model is loaded; choose a checkpoint at the top of the page first."
    forge_model = getattr(model, "forge_objects", None) is not None
    engine_model = forge_model and runs_forge_engine(model)
    if forge_model and not engine_model and getattr(getattr(model, "model", None), "diffusion_model", None) is None:
        return "This model was loaded by Forge's backend without a text engine or UNet to train on; reload it."
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        reason = sdxl_unsupported_reason(model)
        if reason:
            return reason
    elif not (getattr(model, "is_sd1", False) or getattr(model, "is_sd2", False)):
        return "Only SD1.x, SD2.x and SDXL checkpoints can be trained on; load one of those."
    if getattr(getattr(model, "model", None), "conditioning_key", "crossattn") != "crossattn" or \
            getattr(model, "is_inpaint", False):  # wants c_concat/c_adm
        return ("This checkpoint is an inpainting, depth, instruct-pix2pix or unCLIP model, which cannot be "
                "trained on; load a plain SD1.x, SD2.x or SDXL checkpoint.")
    if getattr(model, "lowvram", False):
        return ("Training needs the whole model on the GPU; restart the webui without --lowvram/--medvram "
                "to train.")
    if not engine_model and not hasattr(getattr(model, "cond_stage_model", None), "encode_embedding_init_text"):
        return "The loaded model's text encoder is not the webui's prompt encoder; reload the checkpoint."
    return None


def sdxl_unsupported_reason(model) -> str | None:
    """Why an SDXL-family model cannot be trained on (the refiner, inpainting UNets), or None for the base."""
    if runs_forge_engine(model):  # Forge's backend: the refiner has CLIP-G's engine alone
        base = [getattr(engine, "embedding_key", None) for engine in text_engines(model)] == ["clip_l", "clip_g"]
        unet = getattr(getattr(getattr(model.forge_objects, "unet", None), "model", None), "diffusion_model", None)
    else:
        keys = [getattr(embedder, "input_key", None)
                for embedder in getattr(getattr(model, "conditioner", None), "embedders", [])]
        base = keys.count("txt") == 2 and "aesthetic_score" not in keys
        unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not base:
        return ("SDXL refiner checkpoints cannot be trained on: the refiner has no CLIP-L text encoder and only "
                "finishes the base model's images; load the SDXL base checkpoint (or a model made from it).")
    conv_in = next((m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)), None) if unet is not None else None
    if getattr(model, "is_sdxl_inpaint", False) or (conv_in is not None and conv_in.in_channels != 4):
        return ("SDXL inpainting checkpoints cannot be trained on; load the SDXL base checkpoint (or a model made "
                "from it).")
    return None


def ensure_model_loaded() -> None:
    """Forge loads the selected checkpoint at a generation (the first, and the next after "unload"), not at start-up;
    training loads it the same way. A1111's shared.sd_model loads on first use by itself."""
    reload = getattr(importlib.import_module("modules.sd_models"), "forge_model_reload", None)
    if loaded_model() is None and callable(reload):
        reload()


def training_unavailable_reason() -> str | None:
    """Why training cannot start now (host, or the model already loaded), or None. Never loads a model."""
    model = loaded_model()
    return host_unsupported_reason() or (None if model is None else model_unsupported_reason(model))
