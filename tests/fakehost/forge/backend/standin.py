"""Builds Forge-shaped engines for the test host: "sd1" with tiny real weights made inside inference mode, as Forge's
loader makes every weight (CLIP text encoder, Neo-shaped UNet behind a KModel, VAE), "sdxl" likewise with both text
encoders; "sd2" without weights (Forge has no SD2)."""
from __future__ import annotations

import types

import torch
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.modules.k_model import KModel, Prediction
from backend.nn.unet import IntegratedUNet2DConditionModel, Timestep
from backend.nn.vae import IntegratedAutoencoderKL
from backend.patcher.unet import ModelPatcher, UnetPatcher
from backend.text_processing.classic_engine import ClassicTextProcessingEngine
from modules import shared
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreamartist.standalone.tokenizer import clip_tokenizer

WIDTH = 32  # the stand-in SD1's token width (the real one's 768), and its SDXL's CLIP-L's
XL_G_WIDTH = 48  # the stand-in SDXL's CLIP-G width (the real one's 1280)


def _text_engine(tokenizer, key: str, width: int, text_encoder=None, **kwargs) -> ClassicTextProcessingEngine:
    """A text engine whose database reads the embeddings folder now, as Forge's engines do when built."""
    return ClassicTextProcessingEngine(text_encoder, tokenizer, embedding_dir=shared.cmd_opts.embeddings_dir,
                                       embedding_key=key, embedding_expected_shape=width, **kwargs)


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


def _sdxl_parts(engine: ForgeDiffusionEngine, tokenizer) -> None:
    """CLIP-L and CLIP-G (its pooled, projected EOS state) behind their own engines, the UNet taking the "vector"
    (CLIP-G's pooled output and six size embeddings of 256), the size embedder."""
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(0)
        encoders = {}
        for key, width, model_class in (("clip_l", WIDTH, CLIPTextModel), ("clip_g", XL_G_WIDTH,
                                                                            CLIPTextModelWithProjection)):
            config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                    projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
            encoders[key] = IntegratedCLIP(model_class(config))
            next(m for n, m in encoders[key].named_modules() if n.endswith("final_layer_norm")).bias.normal_(0.5, 0.1)
        clip_model = torch.nn.Module()  # Neo's JointTextEncoder
        clip_model.clip_l, clip_model.clip_g = encoders["clip_l"], encoders["clip_g"]
        unet = KModel(IntegratedUNet2DConditionModel(WIDTH + XL_G_WIDTH, XL_G_WIDTH + 6 * 256), Prediction())
        vae = IntegratedAutoencoderKL()
    width = WIDTH + XL_G_WIDTH
    penultimate = dict(clip_skip=2, minimal_clip_skip=2, final_layer_norm=False)  # Neo's SDXL engines
    engine.text_processing_engine_l = _text_engine(tokenizer, "clip_l", width, encoders["clip_l"], **penultimate)
    engine.text_processing_engine_g = _text_engine(tokenizer, "clip_g", width, encoders["clip_g"], return_pooled=True,
                                                   **penultimate)
    engine.embedder = Timestep(256)
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
        engine.is_sdxl, engine.width = True, WIDTH + XL_G_WIDTH
        _sdxl_parts(engine, tokenizer)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return engine
