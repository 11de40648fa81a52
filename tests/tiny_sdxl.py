"""A tiny SDXL built from the libraries' own classes, with seeded random weights: a diffusers UNet with the
"text_time" added embedding, an AutoencoderKL, transformers' CLIPTextModel (CLIP-L) and CLIPTextModelWithProjection
(OpenCLIP-G), and the real CLIP tokenizer. The standalone tests use it directly; the stand-in webui wraps the same
modules in sgm's shapes, so both paths can be compared on identical weights.

Also the inverse of the single-file conversion: these modules' weights in the original (sgm) checkpoint layout.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

L_WIDTH, G_WIDTH, POOLED_WIDTH, TIME_WIDTH = 16, 24, 20, 8
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=L_WIDTH + G_WIDTH, attention_head_dim=8,
    norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_WIDTH, projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_WIDTH,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4, sample_size=64, scaling_factor=0.13025,
)
_TEXT = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=3, num_attention_heads=2,
             bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the released configs' (legacy) special ids
CLIP_L = dict(_TEXT, hidden_size=L_WIDTH, intermediate_size=2 * L_WIDTH, hidden_act="quick_gelu")
CLIP_G = dict(_TEXT, hidden_size=G_WIDTH, intermediate_size=2 * G_WIDTH, hidden_act="gelu",
              projection_dim=POOLED_WIDTH)
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _offset_norms(*models: torch.nn.Module) -> None:
    """Trained norms are not the identity; random weights that start as one would hide a norm applied twice."""
    for model in models:
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.ndim == 1:
                parameter.data.add_(torch.randn_like(parameter) * 0.1)


def parts(seed: int = 0) -> dict[str, torch.nn.Module]:
    """unet, vae, text_encoder, text_encoder_2 with the same weights for the same seed (global RNG untouched)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = dict(unet=UNet2DConditionModel(**UNET), vae=AutoencoderKL(**VAE),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
        _offset_norms(*built.values())
        with torch.no_grad():  # diffusers zero-initialises the output conv; the tests want a UNet that answers
            built["unet"].conv_out.weight.normal_(0, 0.05)
    return built


def backend(seed: int = 0, **options):
    """An SDXLBackend over ``parts(seed)`` on the CPU in float32."""
    from dreamartist.standalone.backend import scaled_linear_alphas_cumprod
    from dreamartist.standalone.sdxl import SDXLBackend
    from dreamartist.standalone.tokenizer import clip_tokenizer

    return SDXLBackend(**parts(seed), tokenizer=clip_tokenizer(), alphas_cumprod=scaled_linear_alphas_cumprod(),
                       model_name="tiny-sdxl", model_hash="tinysdxl", device="cpu", dtype=torch.float32, **options)


def write_configs(folder: Path) -> Path:
    """The tiny architecture as a config folder (unet/, vae/, text_encoder/, text_encoder_2/, scheduler/)."""
    for part, config in (("unet", UNET), ("vae", VAE), ("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G),
                         ("scheduler", SCHEDULER)):
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    return folder


def sgm_state_dict(models) -> dict[str, torch.Tensor]:
    """``models`` (an SDXL backend, or anything with unet_model, vae_model and text_encoders) in the original
    single-file layout, as the webui and ComfyUI read SDXL checkpoints."""
    from test_standalone import _openclip_to_ldm, _unet_key_to_ldm, _vae_to_ldm

    config = dict(models.unet_model.config)
    sd = {}
    for key, value in models.unet_model.state_dict().items():
        added = re.fullmatch(r"add_embedding\.linear_([12])\.(weight|bias)", key)
        ldm = f"label_emb.0.{0 if added[1] == '1' else 2}.{added[2]}" if added else _unet_key_to_ldm(key, config)
        sd["model.diffusion_model." + ldm] = value
    sd.update(_vae_to_ldm(models.vae_model))
    for key, value in models.text_encoders["clip_l"].state_dict().items():
        if not key.endswith("position_ids"):
            sd["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    g_state = dict(models.text_encoders["clip_g"].state_dict())
    projection = g_state.pop("text_projection.weight")
    openclip = _openclip_to_ldm(g_state)
    openclip["text_projection"] = projection.T  # OpenCLIP keeps (width, projection)
    sd.update({"conditioner.embedders.1.model." + key: value for key, value in openclip.items()})
    return {key: value.detach().clone().contiguous() for key, value in sd.items()}
