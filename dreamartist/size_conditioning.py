"""SDXL's size conditioning: besides the text, the SDXL UNet sees six numbers per row (its "time ids"),

    (original height, original width, crop top, crop left, target height, target width),

embedded beside the pooled text embedding (Podell et al., SDXL, sec. 2.2). Training gives each reference its own
numbers, as SDXL itself was trained: the size of the image before it was scaled, where the crop starts in the
scaled image, and the training size. Sampling uses the usual defaults, original = target = the image size and crop
(0, 0), as the webui and diffusers do. Families without it ignore these numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .images import Reference


def time_ids(original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """One row of time ids (6,), float32."""
    return torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)


def for_references(references: Sequence[Reference]) -> torch.Tensor:
    """(B, 6): each reference's original size and crop, with its pixels' size as the target."""
    rows = []
    for ref in references:
        target = (int(ref.pixels.shape[-2]), int(ref.pixels.shape[-1]))
        rows.append(time_ids(ref.original_size or target, ref.crop_top_left, target))
    return torch.stack(rows)


def defaults(height: int, width: int, rows: int) -> torch.Tensor:
    """(rows, 6) of sampling's defaults: original = target = height x width, crop (0, 0)."""
    return time_ids((height, width), (0, 0), (height, width)).expand(rows, -1).clone()


def for_latents(given: torch.Tensor | None, latents: torch.Tensor, vae_scale: int) -> torch.Tensor:
    """The time ids a UNet call was given, else sampling's defaults for its latents' size."""
    if given is not None:
        return given
    return defaults(latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale, latents.shape[0])
