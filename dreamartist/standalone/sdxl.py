"""SDXL as diffusers and transformers modules, and SDXL single-file checkpoints loaded offline.

The context is CLIP ViT-L's and OpenCLIP ViT-bigG's penultimate hidden states side by side (768 + 1280 = 2048
wide, neither normed), as sgm's conditioner and the webui build it. The UNet also takes OpenCLIP-G's pooled output
(its final-normed EOS state through the text projection, of the prompt's first chunk) and the size conditioning
(dreamartist.size_conditioning), which diffusers embeds beside the pooled vector exactly as sgm's
ConcatTimestepEmbedderND does (256 sinusoidal features per number, cosines first).

A checkpoint in the original layout (``conditioner.embedders.0`` CLIP-L, ``conditioner.embedders.1`` OpenCLIP-G,
``model.diffusion_model``, ``first_stage_model``) is built from the configs in configs/sdxl, written from the
released SDXL base architecture. It predicts v when it says so (a ``v_pred`` key, the safetensors model spec, a
webui config beside it with VScaling) or when asked; a ``ztsnr`` key rescales the schedule to zero terminal SNR.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dreamartist import size_conditioning
from dreamartist.backend import EPSILON, POOLED, TIME_IDS, V_PREDICTION, Conditioning

from . import checkpoint
from .backend import StandaloneBackend, scaled_linear_alphas_cumprod
from .tokenizer import clip_tokenizer

OPENCLIP_G_PREFIX = "conditioner.embedders.1.model."
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # marker keys of v-prediction SDXL checkpoints (empty tensors)
ZTSNR_LAST = 4.8973451890853435e-08  # the webui's (and ComfyUI's) last alphas_cumprod under zero terminal SNR


class SDXLBackend(StandaloneBackend):
    """The Backend protocol over SDXL's UNet, VAE and two text encoders (CLIPTextModel, CLIPTextModelWithProjection).

    ``encode`` returns the pooled vector in ``Conditioning.extras``; ``unet`` takes the size conditioning from there
    too, or sampling's defaults for the latents' size when the caller sets none.
    """

    PENULTIMATE = True

    def __init__(self, *, unet, vae, text_encoder, text_encoder_2, tokenizer, alphas_cumprod: torch.Tensor,
                 prediction_type: str = EPSILON, model_name: str = "", model_hash: str = "",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self._setup("sdxl", unet, vae, {"clip_l": text_encoder, "clip_g": text_encoder_2}, tokenizer, alphas_cumprod,
                    prediction_type, model_name, model_hash, device, dtype)

    def _conditioning(self, per_chunk: list[dict[str, tuple]], branches: tuple) -> Conditioning:
        cond = super()._conditioning(per_chunk, branches)
        cond.extras[POOLED] = per_chunk[0]["clip_g"][1].text_embeds  # the first chunk's, as the webui takes it
        return cond

    def _added_inputs(self, latents: torch.Tensor, cond: Conditioning) -> dict:
        pooled = cond.extras.get(POOLED)
        if pooled is None:
            raise ValueError("SDXL's UNet needs the pooled text embedding; encode the prompts with this backend.")
        ids = size_conditioning.for_latents(cond.extras.get(TIME_IDS), latents, self.vae_scale)
        return {"added_cond_kwargs": {"text_embeds": pooled.to(self.device, self.dtype),
                                      "time_ids": ids.to(self.device, self.dtype)}}


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), alg. 1, on alphas_cumprod as the webui applies it: sqrt(abar) shifted so that the last
    step is 0 and scaled so that the first keeps its value; the last abar is then set to a tiny positive number,
    so that eps-form formulas never divide by zero."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = ZTSNR_LAST
    return rescaled.to(torch.float32)


def declared_prediction(state_dict: dict, path: Path, metadata: dict[str, str]) -> str | None:
    """v when the file carries the ``v_pred`` marker, else what its model spec or a config beside it declares."""
    return V_PREDICTION if V_PRED_KEY in state_dict else checkpoint.sidecar_prediction(path, metadata)


def load_sdxl(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], folder: Path, *,
              prediction_type: str | None, device, dtype) -> SDXLBackend:
    """An SDXLBackend from the tensors of an SDXL base checkpoint, with the configs in ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    scheduler = checkpoint.read_config(folder, "scheduler")
    declared = prediction_type or declared_prediction(state_dict, path, metadata) or EPSILON
    zero_snr = ZTSNR_KEY in state_dict or bool(scheduler.get("rescale_betas_zero_snr"))
    unet, vae, text_encoder = checkpoint.empty_models(folder)
    with torch.device("meta" if checkpoint.ASSIGN_SUPPORTED else "cpu"):
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_dict(checkpoint.read_config(folder, "text_encoder_2")))
    unet_weights, vae_weights, text_weights = checkpoint.convert_weights(state_dict, "sdxl", unet, vae, text_encoder)
    text_2_weights = checkpoint.text_encoder_weights(state_dict, text_encoder_2, OPENCLIP_G_PREFIX)
    del state_dict
    alphas = scaled_linear_alphas_cumprod(scheduler["beta_start"], scheduler["beta_end"],
                                          scheduler["num_train_timesteps"])
    materialize = checkpoint.materialize
    return SDXLBackend(
        unet=materialize(unet, unet_weights, "UNet"), vae=materialize(vae, vae_weights, "VAE"),
        text_encoder=materialize(text_encoder, text_weights, "CLIP-L text encoder"),
        text_encoder_2=materialize(text_encoder_2, text_2_weights, "OpenCLIP-G text encoder"),
        tokenizer=clip_tokenizer(), alphas_cumprod=rescale_zero_terminal_snr(alphas) if zero_snr else alphas,
        prediction_type=declared, model_name=path.stem, model_hash=checkpoint.file_short_hash(path), device=device,
        dtype=dtype)
