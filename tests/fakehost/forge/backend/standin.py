"""Builds Forge-shaped engines for the test host: "sd1" with tiny real weights made inside inference mode, as Forge's
loader makes every weight (CLIP text encoder, Neo-shaped UNet behind a KModel, VAE); "sd2", "sdxl" without weights
(Forge has no SD2 and its SDXL is not trained here)."""
from __future__ import annotations

import types

import torch
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.modules.k_model import KModel, Prediction
from backend.nn.unet import IntegratedUNet2DConditionModel
from backend.nn.vae import IntegratedAutoencoderKL
from backend.patcher.unet import ModelPatcher, UnetPatcher
from backend.text_processing.classic_engine import ClassicTextProcessingEngine
from modules import shared
from transformers import CLIPTextConfig, CLIPTextModel

from dreamartist.standalone.tokenizer import clip_tokenizer

WIDTH = 32  # the stand-in SD1's token width (the real one's 768)


def _text_engine(tokenizer, key: str, width: int, text_encoder=None) -> ClassicTextProcessingEngine:
    """A text engine whose database reads the embeddings folder now, as Forge's engines do when built."""
    return ClassicTextProcessingEngine(text_encoder, tokenizer, embedding_dir=shared.cmd_opts.embeddings_dir,
                                       embedding_key=key, embedding_expected_shape=width)


class IntegratedCLIP(torch.nn.Module):
    def __init__(self, transformer: CLIPTextModel):
        super().__init__()
        self.transformer = transformer


def _sd1_parts(engine: ForgeDiffusionEngine, tokenizer) -> None:
    # Forge's forge_loader builds every weight inside inference mode
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(0)
        config = CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        text_encoder = IntegratedCLIP(CLIPTextModel(config))
        # a trained CLIP's final norm has a bias, so its output mean is far from 0 (emphasis divides by it)
        next(m for n, m in text_encoder.named_modules() if n.endswith("final_layer_norm")).bias.normal_(0.5, 0.1)
        clip_model = torch.nn.Module()  # Neo's JointTextEncoder
        clip_model.clip_l = text_encoder
        unet = KModel(IntegratedUNet2DConditionModel(WIDTH), Prediction())
        vae = IntegratedAutoencoderKL()
    engine.text_processing_engine = _text_engine(tokenizer, "clip_l", WIDTH, text_encoder)
    engine.forge_objects = ForgeObjects(
        UnetPatcher(unet), types.SimpleNamespace(cond_stage_model=clip_model, patcher=ModelPatcher(clip_model)),
        types.SimpleNamespace(first_stage_model=vae, patcher=ModelPatcher(vae)), None)
    engine.forge_objects_original = engine.forge_objects.shallow_copy()
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()


def build(kind: str) -> ForgeDiffusionEngine:
    engine, tokenizer = ForgeDiffusionEngine(), clip_tokenizer()
    if kind == "sd1":
        engine.is_sd1 = True
        _sd1_parts(engine, tokenizer)
    elif kind == "sd2":
        engine.is_sd2, engine.width = True, 1024
        engine.text_processing_engine = _text_engine(tokenizer, "clip_h", 1024)
    elif kind == "sdxl":
        engine.is_sdxl, engine.width = True, 2048
        engine.text_processing_engine_l = _text_engine(tokenizer, "clip_l", 2048)
        engine.text_processing_engine_g = _text_engine(tokenizer, "clip_g", 2048)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return engine
