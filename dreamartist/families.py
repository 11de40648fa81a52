"""The model families DreamArtist knows, in one table read by the pair files and both backends.

A family is named by the text encoders whose token tables a pseudo-word lives in: one CLIP-L table for SD 1.x,
one OpenCLIP-H table for SD 2.x, CLIP-L plus OpenCLIP-bigG for SDXL. Vectors in the core are dicts keyed by
these encoder keys.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Family:
    key: str  # "sd1" | "sd2" | "sdxl"
    label: str  # as users say it
    widths: Mapping[str, int]  # encoder key -> token-embedding width of the released models
    size: int  # the default training size (pixels per side): the base model's, 512 for SD2 too


FAMILIES = {
    "sd1": Family("sd1", "SD1", {"clip_l": 768}, 512),
    "sd2": Family("sd2", "SD2", {"clip_h": 1024}, 512),
    "sdxl": Family("sdxl", "SDXL", {"clip_l": 768, "clip_g": 1280}, 1024),
}
SINGLE_ENCODER_BY_WIDTH = {width: key for f in FAMILIES.values() if len(f.widths) == 1
                           for key, width in f.widths.items()}  # a lone tensor in a file: 768 -> clip_l


def family_of(encoder_keys: Iterable[str]) -> Family:
    """The family whose text encoders are exactly ``encoder_keys`` (any widths: test and toy models are small)."""
    keys = set(encoder_keys)
    for family in FAMILIES.values():
        if set(family.widths) == keys:
            return family
    raise InputError(f"Unknown text-encoder set {sorted(keys)}; expected clip_l, clip_h or clip_l+clip_g.")


def describe(dims: Mapping[str, int]) -> str:
    """'SD1 (768-wide)', 'SDXL (768+1280-wide)' for a mapping encoder key -> width."""
    widths = "+".join(str(dims[k]) for k in sorted(dims, key=lambda k: k != "clip_l"))
    try:
        label = family_of(dims).label
    except InputError:
        label = "+".join(sorted(dims))
    return f"{label} ({widths}-wide)"
