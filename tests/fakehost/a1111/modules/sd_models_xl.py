"""modules.sd_models_xl: what the webui adds to sgm's DiffusionEngine and GeneralConditioner so that SDXL looks like
SD1 to the rest of it (get_learned_conditioning with the size conditioning, apply_model, extend_sdxl)."""
from __future__ import annotations

import torch
from ldm import sdxl as sgm
from modules import devices, shared
from modules._variant import FLAGS


def get_learned_conditioning(self, batch):
    """The conditioner on the prompts plus original size = target size = the image's (1024 when unknown), crop
    from the settings; an all-empty negative prompt gets zero text embeddings."""
    for embedder in self.conditioner.embedders:
        embedder.ucg_rate = 0.0
    width = getattr(batch, "width", 1024) or 1024
    height = getattr(batch, "height", 1024) or 1024
    is_negative_prompt = getattr(batch, "is_negative_prompt", False)
    opts = shared.opts
    aesthetic = opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt else opts.sdxl_refiner_high_aesthetic_score
    args = dict(device=devices.device, dtype=devices.dtype)
    conds = {
        "txt": batch,
        "original_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1),
        "crop_coords_top_left": torch.tensor([opts.sdxl_crop_top, opts.sdxl_crop_left], **args).repeat(len(batch), 1),
        "target_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1),
        "aesthetic_score": torch.tensor([aesthetic], **args).repeat(len(batch), 1),
    }
    force_zero = is_negative_prompt and all(x == "" for x in batch)
    return self.conditioner(conds, force_zero_embeddings=["txt"] if force_zero else [])


def apply_model(self, x, t, cond):
    if getattr(self, "is_sdxl_inpaint", False):
        x = torch.cat([x] + cond["c_concat"], dim=1)
    return self.model(x, t, cond)


def get_first_stage_encoding(self, x):  # encode_first_stage already scales
    return x


sgm.DiffusionEngine.get_learned_conditioning = get_learned_conditioning
sgm.DiffusionEngine.apply_model = apply_model
sgm.DiffusionEngine.get_first_stage_encoding = get_first_stage_encoding


def encode_embedding_init_text(self, init_text, nvpt):
    found = [e.encode_embedding_init_text(init_text, nvpt) for e in self.embedders
             if hasattr(e, "encode_embedding_init_text")]
    return torch.cat(found, dim=1)


def tokenize(self, texts):
    for embedder in [e for e in self.embedders if hasattr(e, "tokenize")]:
        return embedder.tokenize(texts)
    raise AssertionError("no tokenizer available")


def process_texts(self, texts):
    for embedder in [e for e in self.embedders if hasattr(e, "process_texts")]:
        return embedder.process_texts(texts)


def get_target_prompt_token_count(self, token_count):
    for embedder in [e for e in self.embedders if hasattr(e, "get_target_prompt_token_count")]:
        return embedder.get_target_prompt_token_count(token_count)


sgm.GeneralConditioner.encode_embedding_init_text = encode_embedding_init_text
sgm.GeneralConditioner.tokenize = tokenize
sgm.GeneralConditioner.process_texts = process_texts
sgm.GeneralConditioner.get_target_prompt_token_count = get_target_prompt_token_count


def extend_sdxl(model) -> None:
    """Flags and fields that make SDXL look like SD1: parameterization from the denoiser's scaling, the legacy DDPM
    alphas_cumprod (in the UNet's dtype in 1.6/1.7, float32 from 1.8), a dummy conditioner.wrapped."""
    dtype = next(model.model.diffusion_model.parameters()).dtype
    model.model.diffusion_model.dtype = dtype
    model.model.conditioning_key = "crossattn"
    model.cond_stage_key = "txt"
    model.parameterization = "v" if isinstance(model.denoiser.scaling, sgm.VScaling) else "eps"
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1.0 - betas, dim=0)
    model.alphas_cumprod = alphas.to(devices.device, dtype if FLAGS.alphas_follow_half else torch.float32)
    model.conditioner.wrapped = torch.nn.Module()
