"""The Backend protocol over the webui's loaded SDXL model (sgm's DiffusionEngine behind the webui's hijack).

Everything runs through the webui's own objects, reusing the loaded weights: the prompts through each text embedder
of the conditioner (the webui's CLIP-L and OpenCLIP-G prompt encoders: chunking, emphasis, embeddings; called
directly because the conditioner itself runs them under no_grad), the size conditioning through the conditioner's
own ConcatTimestepEmbedderND embedders, the UNet through ``apply_model`` with the {"crossattn", "vector"} dict the
webui's sampler passes, and the VAE's posterior mean through the first stage's encoder (sgm's ``encode_first_stage``
samples it).
"""
from __future__ import annotations

import torch
from modules import devices

from dreamartist import size_conditioning
from dreamartist.backend import POOLED, TIME_IDS, Conditioning

from .host_backend import HostBackend

TEXT_KEY = "txt"
SIZE_KEYS = {"original_size_as_tuple": slice(0, 2), "crop_coords_top_left": slice(2, 4),
             "target_size_as_tuple": slice(4, 6)}  # the conditioner's input keys -> their columns of the time ids


class SDXLHostBackend(HostBackend):
    """HostBackend for SDXL base models; the family checks are the base class's (host.model_unsupported_reason)."""

    def __init__(self, sd_model=None):
        super().__init__(sd_model)
        embedders = list(self.sd_model.conditioner.embedders)
        self.text_embedders = [e for e in embedders if getattr(e, "input_key", None) == TEXT_KEY]
        self.size_embedders = [e for e in embedders if getattr(e, "input_key", None) in SIZE_KEYS]

    def _text_conditioning(self, prompts: list[str]) -> Conditioning:
        """Both prompt encoders' states side by side (the conditioner's "crossattn"), and OpenCLIP-G's pooled vector
        of the first chunk (the start of its "vector")."""
        contexts, pooled = [], None
        for embedder in self.text_embedders:
            out = embedder(prompts)
            if isinstance(out, (tuple, list)):
                out, pooled = out
            contexts.append(out)
        return Conditioning(context=torch.cat(contexts, dim=2), extras={POOLED: pooled})

    def _unet_cond(self, latents: torch.Tensor, cond: Conditioning) -> dict:
        """{"crossattn", "vector"}: the vector is the pooled text embedding followed by each size embedder's output
        on its columns of the time ids (sampling's defaults for the latents' size when the caller set none)."""
        ids = size_conditioning.for_latents(cond.extras.get(TIME_IDS), latents, self.vae_scale)
        ids = ids.to(self.device, torch.float32)
        vector = [cond.extras[POOLED]] + [embedder(ids[:, SIZE_KEYS[embedder.input_key]])
                                          for embedder in self.size_embedders]
        return {"crossattn": cond.context.to(self.device, devices.dtype_unet),
                "vector": torch.cat([v.to(self.device, devices.dtype_unet) for v in vector], dim=1)}

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior mean times scale_factor (sgm's encode_first_stage would sample), in the VAE's own dtype
        with autocast off, no gradient."""
        first_stage = self.sd_model.first_stage_model
        with torch.no_grad(), devices.without_autocast():
            moments = first_stage.quant_conv(first_stage.encoder(pixels.to(self.device, self._vae_dtype())))
            mean = torch.chunk(moments, 2, dim=1)[0]
            return (self.sd_model.scale_factor * mean).float()


def backend_for(sd_model=None) -> HostBackend:
    """The host backend of the loaded model's family."""
    from modules import shared

    from . import host
    from .host_backend_forge import ForgeBackend

    model = shared.sd_model if sd_model is None else sd_model
    if host.runs_forge_engine(model):
        return ForgeBackend(model)
    return (SDXLHostBackend if getattr(model, "is_sdxl", False) else HostBackend)(model)
