"""The toy world's SD1-family model: configs, building, saving and loading it as a StandaloneBackend.

A diffusers UNet2DConditionModel with cross-attention over a 16x16x4 latent, a tiny AutoencoderKL (4x4 pixels
per latent cell) and a frozen, seeded-random transformers CLIPTextModel read through the real CLIP tokenizer,
so pseudo-words take exactly the embedding-splicing path they take in Stable Diffusion 1.x.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from dreamartist.backend import EPSILON

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_SIZE = 64
MODEL_NAME = "toyworld"
PARTS = ("text_encoder", "vae", "unet")

TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# Three levels: one latent cell covers 4x4 pixels, so a 64x64 image is a 16x16x4 latent.
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=[16, 32, 64],
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0,
)
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 96, 128],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
)
# SD's noise schedule and prediction type; the defaults every loader of this model uses.
SCHEDULE = dict(kind="scaled_linear", beta_start=0.00085, beta_end=0.012, steps=1000, prediction_type=EPSILON)


def build_text_encoder(config: dict | None = None, seed: int | None = None):
    """A CLIPTextModel from ``config``, with seeded random weights when ``seed`` is given."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**(config or TEXT_ENCODER)))


def build_vae(config: dict | None = None, seed: int | None = None):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return AutoencoderKL(**(config or VAE))


def build_unet(config: dict | None = None, seed: int | None = None):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DConditionModel(**(config or UNET))


BUILDERS = {"text_encoder": build_text_encoder, "vae": build_vae, "unet": build_unet}


def save_part(module: torch.nn.Module, config: dict, folder: Path, part: str) -> None:
    """``part.safetensors`` (float16) and ``part.json`` (its config) in ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()
               if not k.endswith("position_ids")}
    save_file(tensors, str(folder / f"{part}.safetensors"))
    (folder / f"{part}.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def load_part(folder: Path, part: str, data: bytes | None = None) -> torch.nn.Module:
    """A model part from ``folder`` (its weight file's bytes ``data`` when already read), weights as float32 (every
    weight must be in the file)."""
    from safetensors.torch import load

    config = json.loads((folder / f"{part}.json").read_text(encoding="utf-8"))
    module = BUILDERS[part](config)
    data = (folder / f"{part}.safetensors").read_bytes() if data is None else data
    tensors = {k: v.float() for k, v in load(data).items()}
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{part} weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module.eval()


def weights_hash(files: Mapping[str, bytes]) -> str:
    """The first 10 hex digits of a sha256 over the model's weight files (part -> bytes), as the webui shows a
    checkpoint hash."""
    digest = hashlib.sha256()
    for part in PARTS:
        digest.update(files[part])
    return digest.hexdigest()[:10]


def alphas_cumprod(schedule: dict | None = None) -> torch.Tensor:
    from dreamartist.standalone.backend import scaled_linear_alphas_cumprod

    schedule = schedule or SCHEDULE
    return scaled_linear_alphas_cumprod(schedule["beta_start"], schedule["beta_end"], schedule["steps"])


def assemble(text_encoder, vae, unet, device: torch.device | str | None = None, model_hash: str = ""):
    """The three parts as an SD1-family StandaloneBackend (float32, as the toy model is small)."""
    from dreamartist.standalone import StandaloneBackend, clip_tokenizer

    return StandaloneBackend(
        family="sd1", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        alphas_cumprod=alphas_cumprod(), prediction_type=SCHEDULE["prediction_type"], model_name=MODEL_NAME,
        model_hash=model_hash, device=device, dtype=torch.float32, image_size=IMAGE_SIZE)


def load_backend(device: torch.device | str | None = None, folder: str | Path | None = None):
    """The pretrained toy-world model (shipped in ``weights/``) as an SD1 StandaloneBackend."""
    folder = Path(folder) if folder else WEIGHTS_DIR
    files = {part: (folder / f"{part}.safetensors").read_bytes() for part in PARTS}  # read once: loaded and hashed
    parts = {part: load_part(folder, part, files[part]) for part in PARTS}
    return assemble(parts["text_encoder"], parts["vae"], parts["unet"], device, weights_hash(files))
