"""Builds Forge-shaped engines for the test host: "sd1", "sd2", "sdxl" (no weights; Forge is refused for training)."""
from __future__ import annotations

from backend.diffusion_engine.base import ForgeDiffusionEngine
from backend.text_processing.classic_engine import ClassicTextProcessingEngine
from modules import shared

from dreamartist.standalone.tokenizer import clip_tokenizer


def build(kind: str) -> ForgeDiffusionEngine:
    engine = ForgeDiffusionEngine()
    folder, tokenizer = shared.cmd_opts.embeddings_dir, clip_tokenizer()
    if kind == "sd1":
        engine.is_sd1 = True
        engine.text_processing_engine = ClassicTextProcessingEngine(tokenizer, folder, "clip_l", 768)
    elif kind == "sd2":
        engine.is_sd2, engine.width = True, 1024
        engine.text_processing_engine = ClassicTextProcessingEngine(tokenizer, folder, "clip_h", 1024)
    elif kind == "sdxl":
        engine.is_sdxl, engine.width = True, 2048
        engine.text_processing_engine_l = ClassicTextProcessingEngine(tokenizer, folder, "clip_l", 2048)
        engine.text_processing_engine_g = ClassicTextProcessingEngine(tokenizer, folder, "clip_g", 2048)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return engine
