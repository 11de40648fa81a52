"""The standalone backend: Stable Diffusion as diffusers/transformers modules, for the CLI and the tests.

The only package that imports diffusers and transformers, and only when one of its functions runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import StandaloneBackend
    from .checkpoint import load_checkpoint
    from .random_model import build_random_backend
    from .sdxl import SDXLBackend
    from .tokenizer import clip_tokenizer

__all__ = ["SDXLBackend", "StandaloneBackend", "build_random_backend", "clip_tokenizer", "load_checkpoint"]
_HOMES = {"StandaloneBackend": "backend", "SDXLBackend": "sdxl", "build_random_backend": "random_model",
          "clip_tokenizer": "tokenizer", "load_checkpoint": "checkpoint"}


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use, so importing this package stays cheap."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
