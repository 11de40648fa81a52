"""Builds the tiny seeded models a test host loads: "sd1", "sd2" (v-prediction), "sdxl" (sgm-shaped, ldm/sdxl.py;
also "sdxl-vpred"), and for refusals "sdxl-refiner", "sdxl-inpainting" and "sd1-inpainting" (9 input channels,
conditioning_key 'hybrid')."""
from __future__ import annotations

import torch
from modules._variant import FLAGS

from . import sdxl
from .encoders import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from .models import LatentDiffusion, UNetModel

SEEDS = {"sd1": 1, "sd2": 2, "sd1-inpainting": 4}


def build(kind: str) -> torch.nn.Module:
    """A fresh model of ``kind`` with the same seeded weights every time, leaving the global RNG untouched."""
    if kind.startswith("sdxl"):
        return sdxl.build(kind)  # the weights of tests/tiny_sdxl.parts(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS[kind])
        if kind == "sd1":
            return LatentDiffusion(UNetModel(context_dim=32, use_checkpoint=FLAGS.unet_use_checkpoint),
                                   FrozenCLIPEmbedder(32), parameterization="eps")
        if kind == "sd2":
            return LatentDiffusion(UNetModel(context_dim=48, use_checkpoint=FLAGS.unet_use_checkpoint),
                                   FrozenOpenCLIPEmbedder(48), parameterization="v")
        if kind == "sd1-inpainting":
            return LatentDiffusion(UNetModel(context_dim=32, in_channels=9), FrozenCLIPEmbedder(32),
                                   conditioning_key="hybrid")
    raise ValueError(f"unknown model kind {kind!r}")
