"""A tiny SD 1.x model with seeded random weights: the real architecture at toy size, built from no files."""
from __future__ import annotations

import torch

from dreamartist.backend import EPSILON

from .backend import StandaloneBackend, scaled_linear_alphas_cumprod
from .tokenizer import clip_tokenizer

RANDOM_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
# Four VAE levels so that, as in SD, one latent cell covers 8x8 pixels.
RANDOM_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4, sample_size=64, scaling_factor=0.18215,
)
RANDOM_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def build_random_backend(seed: int = 0, device: torch.device | str | None = None) -> StandaloneBackend:
    """The SD1 architecture (UNet with cross-attention, 4-level VAE, CLIP text encoder) at toy size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**RANDOM_UNET)
        vae = AutoencoderKL(**RANDOM_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**RANDOM_TEXT_ENCODER))
    return StandaloneBackend(
        family="sd1", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type=EPSILON,
        model_name="random", model_hash="random", device=device, dtype=torch.float32,
    )
