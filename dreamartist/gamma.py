"""The training guidance scale gamma: a constant, or a schedule over the diffusion timestep t.

Grammar (parsed, never evaluated):  NUMBER  |  LOW "-" HIGH [":" ("ln" | "cos" | "cos2")]
With r = t / (T - 1), gamma(t) = LOW + (HIGH - LOW) * s(r), where s is r (ln, the default),
sin(r*pi/2) (cos) or 1 - cos(r*pi/2) (cos2), as in the original DreamArtist extension.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import InputError

GAMMA_MAX = 30.0  # far beyond any useful guidance; larger values only make the loss overflow
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_GRAMMAR = re.compile(rf"^\s*({_NUMBER})\s*(?:-\s*({_NUMBER})\s*(?::\s*(ln|cos2|cos)\s*)?)?$")
SHAPES = {
    "ln": lambda r: r,
    "cos": lambda r: torch.sin(r * math.pi / 2),
    "cos2": lambda r: 1 - torch.cos(r * math.pi / 2),
}


@dataclass(frozen=True)
class GammaSchedule:
    low: float
    high: float
    shape: str = "ln"

    @property
    def constant(self) -> bool:
        return self.low == self.high

    def __call__(self, t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """gamma for each timestep in ``t`` (B,), as float32 (B,)."""
        if self.constant:
            return torch.full(t.shape, self.low, dtype=torch.float32, device=t.device)
        r = t.to(torch.float32) / (num_timesteps - 1)
        return self.low + (self.high - self.low) * SHAPES[self.shape](r)

    def __str__(self) -> str:
        if self.constant:
            return f"{self.low:g}"
        return f"{self.low:g}-{self.high:g}" + ("" if self.shape == "ln" else f":{self.shape}")


def parse_gamma(text: str | float | int) -> GammaSchedule:
    """Parse '3', '5.0', '1.5-3.0', '1.5-3.0:cos' or '1.5-3.0:cos2'; anything else is an InputError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(float(text))
    match = _GRAMMAR.match(str(text)) if isinstance(text, str) else None
    if not match:
        raise InputError(f"Gamma {text!r} is not a number or a schedule like 1.5-3.0, 1.5-3.0:cos, 1.5-3.0:cos2.")
    low = float(match.group(1))
    high = float(match.group(2)) if match.group(2) else low
    if not all(0 < g <= GAMMA_MAX for g in (low, high)):
        raise InputError(f"Gamma {text!r} must be above 0 and at most {GAMMA_MAX:g} (3 for objects, 5 for styles).")
    return GammaSchedule(low, high, match.group(3) or "ln")
