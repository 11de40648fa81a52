"""A pretrained toy world: procedural scenes, a small SD1-family text-to-image model and an attribute classifier.

``load_backend()`` gives the shipped model as a StandaloneBackend (family "sd1") that the trainer, the sampler,
the CLI and the stand-in host use like any SD 1.x checkpoint; ``load_classifier()`` scores generated images.
Importing this package is cheap: diffusers and transformers load on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .classifier import load_classifier
    from .models import load_backend

__all__ = ["load_backend", "load_classifier"]
_HOMES = {"load_backend": "models", "load_classifier": "classifier"}


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
