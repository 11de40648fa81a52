"""Identity mode's augmentation of its one image (Beyond Inserting, sec. IV-A: colour jitter, flip, scaling).

The paper lost the ranges; methods.md's reading: horizontal flip with probability 0.5, scale in [0.8, 1.2] about the
centre with the border pixels extended, brightness, contrast and saturation each by a factor in [0.9, 1.1] (no hue
shift: the identity's colours are part of it). Every draw comes from the run's generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLIP_P = 0.5
SCALE = (0.8, 1.2)
JITTER = 0.1


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One augmented copy of ``pixels`` (3, H, W) in [-1, 1]."""
    flip = float(torch.rand((), generator=generator)) < FLIP_P
    scale = _uniform(*SCALE, generator)
    brightness, contrast, saturation = (_uniform(1 - JITTER, 1 + JITTER, generator) for _ in range(3))
    x = (pixels.float() + 1) / 2
    if flip:
        x = x.flip(-1)
    theta = torch.tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]]).unsqueeze(0)
    grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
    x = F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    x = x * brightness
    mean = x.mean()
    x = (x - mean) * contrast + mean
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    x = (x - grey) * saturation + grey
    return x.clamp(0, 1) * 2 - 1
