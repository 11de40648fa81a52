"""backend.diffusion_engine.base: ForgeDiffusionEngine and ForgeObjects, shaped for detection and refusals."""
from __future__ import annotations

import torch
from backend.patcher.unet import UnetPatcher


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine(torch.nn.Module):
    is_sd1 = is_sd2 = is_sdxl = is_sd3 = False
    width = 768

    def __init__(self):
        super().__init__()
        self.forge_objects = ForgeObjects(UnetPatcher(), None, None, None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.cond_stage_model = None
        self.first_stage_model = None
        self.sd_checkpoint_info = None
        self.sd_model_hash = None
        self.filename = None
        self.is_inpaint = False

    def is_webui_legacy_model(self) -> bool:
        return self.is_sd1 or self.is_sd2 or self.is_sdxl

    def text_engines(self) -> list:
        return [getattr(self, n) for n in ("text_processing_engine", "text_processing_engine_l",
                                           "text_processing_engine_g") if hasattr(self, n)]

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        """The text engine's encoding (SD1 with weights); SDXL's {"crossattn", "vector"} as Neo builds them (both
        engines' states side by side; CLIP-G's pooled output and the embedded size numbers); zeros for the
        weightless engines."""
        engine = getattr(self, "text_processing_engine", None)
        if getattr(engine, "text_encoder", None) is not None:
            return engine(prompts)
        if getattr(getattr(self, "text_processing_engine_g", None), "text_encoder", None) is not None:
            cond_l = self.text_processing_engine_l(prompts)
            cond_g, pooled = self.text_processing_engine_g(prompts)
            height, width = getattr(prompts, "height", 1024) or 1024, getattr(prompts, "width", 1024) or 1024
            sizes = self.embedder(torch.tensor([height, width, 0, 0, height, width])).flatten()
            return {"crossattn": torch.cat([cond_l, cond_g], dim=2),
                    "vector": torch.cat([pooled, sizes.expand(pooled.shape[0], -1).to(pooled)], dim=1)}
        return torch.zeros(len(prompts), 77, self.width)

    def get_first_stage_encoding(self, x):  # the encode already scales, as Neo's does
        return x

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return torch.zeros(x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)

    @torch.inference_mode()
    def decode_first_stage(self, z):
        """The VAE's decode (SD1 with weights), zeros for the weightless engines."""
        vae = getattr(getattr(self.forge_objects, "vae", None), "first_stage_model", None)
        if vae is not None:
            return vae.decode(vae.process_out(z))
        return torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8)
