"""What reForge's load_model_for_a1111 makes of the webui's model object: its UNet, text encoder and VAE behind
ModelPatchers (forge_objects, with the LoRA-free forge_objects_original and forge_objects_after_applying_lora),
the same module objects as the model's own parts, and a VAE encode that returns scaled latents in inference mode,
through ldm_patched's regularizer (Classic's samples the posterior)."""
from __future__ import annotations

import types

import torch
from ldm_patched.modules.model_patcher import ModelPatcher
from modules._variant import FLAGS


class ForgeObjects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae = unet, clip, vae

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet, self.clip, self.vae)


class DiagonalGaussianRegularizer(torch.nn.Module):
    """ldm_patched's: the posterior's sample when ``sample`` is on (Forge Classic's default), else its mode."""

    def __init__(self, sample: bool):
        super().__init__()
        self.sample = sample

    def forward(self, posterior):
        return posterior.sample() if self.sample else posterior.mode()


class BaseModel(torch.nn.Module):
    """ldm_patched's model_base.BaseModel: holds the diffusion model (the webui model's own)."""

    def __init__(self, diffusion_model: torch.nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model


def attach(sd_model) -> None:
    if FLAGS.inplace_residuals:  # Forge Classic's ldm_patched blocks
        from ldm_patched.ldm.modules.attention import BasicTransformerBlock

        for module in sd_model.model.diffusion_model.modules():
            if type(module).__name__ == "BasicTransformerBlock":
                module.__class__ = BasicTransformerBlock
    objects = ForgeObjects(
        unet=ModelPatcher(BaseModel(sd_model.model.diffusion_model)),
        clip=types.SimpleNamespace(patcher=ModelPatcher(sd_model.cond_stage_model.wrapped)),
        vae=types.SimpleNamespace(patcher=ModelPatcher(sd_model.first_stage_model)))
    sd_model.forge_objects = objects
    # set as load_model_for_a1111 sets them, after the prompt encoder is wrapped: the SD 2.x wrapper has no ``model``,
    # so an SD 2.x model says is_sd1
    sd_model.is_sd2 = not sd_model.is_sdxl and hasattr(sd_model.cond_stage_model, "model")
    sd_model.is_sd1 = not sd_model.is_sdxl and not sd_model.is_sd2
    sd_model.forge_objects_original = objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = objects.shallow_copy()
    encode, encoding = sd_model.encode_first_stage, sd_model.get_first_stage_encoding
    sd_model.first_stage_model.regularization = regularize = DiagonalGaussianRegularizer(FLAGS.vae_samples_posterior)

    @torch.inference_mode()
    def encode_first_stage(x):
        posterior = encode(x)
        return encoding(posterior if isinstance(posterior, torch.Tensor) else regularize(posterior))

    sd_model.encode_first_stage = encode_first_stage
    sd_model.get_first_stage_encoding = lambda x: x
