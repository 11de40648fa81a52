"""Builds Forge-shaped engines for the test host: "sd1", "sd2", "sdxl" (no weights; Forge is refused for training)."""
from __future__ import annotations

from backend.diffusion_engine.base import ForgeDiffusionEngine
from backend.text_processing.classic_engine import ClassicTextProcessingEngine
from modules import shared

from dreamartist.standalone.tokenizer import clip_tokenizer


def _text_engine(tokenizer, key: str, width: int) -> ClassicTextProcessingEngine:
    """A text engine whose database reads the embeddings folder now, as Forge's engines do when built."""
    return ClassicTextProcessingEngine(None, tokenizer, embedding_dir=shared.cmd_opts.embeddings_dir,
                                       embedding_key=key, embedding_expected_shape=width)


def build(kind: str) -> ForgeDiffusionEngine:
    engine, tokenizer = ForgeDiffusionEngine(), clip_tokenizer()
    if kind == "sd1":
        engine.is_sd1 = True
        engine.text_processing_engine = _text_engine(tokenizer, "clip_l", 768)
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
