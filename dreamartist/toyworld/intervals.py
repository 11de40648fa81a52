"""95 % intervals by the bootstrap over units (a unit is one concept and one seed), plain and paired.

A paired difference resamples the same units for both methods, so what the methods share (the concept, the
seed, the sampling noise, which the benchmarks hold fixed per unit) cancels. Units where a figure is undefined
(NaN: a leak over no faithful image) are left out, of both methods for a paired difference.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    units: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        if self.units == 0:
            return "n/a"
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def bootstrap(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean of ``values`` and its percentile bootstrap interval (NaNs left out)."""
    kept = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if len(kept) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if len(kept) == 1:
        value = float(kept[0])
        return Interval(value, value, value, 1)
    picks = torch.randint(0, len(kept), (resamples, len(kept)), generator=torch.Generator().manual_seed(seed))
    means = kept[picks].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(float(kept.mean()), low, high, len(kept))


def paired(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
           seed: int = 0) -> Interval:
    """The mean of a - b over matched units and its bootstrap interval (units undefined in either left out)."""
    if len(a) != len(b):
        raise ValueError("a paired difference needs the same units on both sides")
    return bootstrap([x - y for x, y in zip(a, b)], resamples, level, seed)
