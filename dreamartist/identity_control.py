"""What identity mode does inside the UNet's cross-attention (an ``attention_control.Controller``).

- K/V split: for the call in progress the driving loop parks the value contexts (``values``, row-aligned with the
  UNet's context, which carries the K variant); every cross-attention projects its keys from the context and its
  values from them.
- Face-wise attention loss (Beyond Inserting, sec. III-B): at the chosen levels, the target maps A_t (the explicit
  softmax of this call) against the maps A_r the same queries give with the reference prompt's keys (the layer's own
  ``to_k`` applied to the parked reference context; a target, without gradient). Per layer: maps averaged over heads,
  squared error summed over tokens (all 77 columns) and pixels, as the paper writes it ("sum"), or a mean over every
  element ("mean"); mean over the layers. With lambda 0.003 the sum puts lambda * L_attn at 0.07 (median) to 0.16
  (mean) of L_LDM at the start on the toy-world model (methods.md's calibration asks for 0.1-0.5); the mean, at 1e-5,
  would do nothing.
- Maps of one token column, recorded at the chosen levels (``record``), for the mass-inside-the-face diagnostic.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .attention_control import CROSS, Controller, Site


class IdentityControl(Controller):
    def __init__(self, levels: frozenset[int] = frozenset(), reduction: str = "sum"):
        self.levels, self.reduction = levels, reduction
        self.values: torch.Tensor | None = None  # (rows, tokens, dim) for the call in progress
        self.reference: torch.Tensor | None = None  # (rows, tokens, dim): the loss is on while set
        self.column: int | None = None  # token column whose maps ``record`` keeps
        self.terms: list[torch.Tensor] = []  # per loss layer, (rows,)
        self.maps: list[torch.Tensor] = []  # per recorded layer, (rows, pixels)
        self._targets: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def call(self, values: torch.Tensor | None = None, reference: torch.Tensor | None = None,
             column: int | None = None) -> Iterator[None]:
        """Park the value contexts (and the reference context, or the column to record) for the UNet calls of the
        with-block."""
        self.values, self.reference, self.column = values, reference, column
        try:
            yield
        finally:
            self.values = self.reference = self.column = None
            self._targets.clear()

    def _reads(self, site: Site) -> bool:
        return site.kind == CROSS and site.level in self.levels and (
            self.reference is not None or self.column is not None)

    def contexts(self, site, key_context, value_context):
        if site.kind == CROSS and self.values is not None:
            if self.values.shape != key_context.shape:
                raise ValueError(f"value contexts {tuple(self.values.shape)} for a context of "
                                 f"{tuple(key_context.shape)} at {site.layer}")
            value_context = self.values.to(value_context.dtype)
        return key_context, value_context

    def keys_values(self, site, query, key, value):
        if self._reads(site) and self.reference is not None:
            with torch.no_grad():
                ref = site.module.to_k(self.reference.to(query.dtype))
                ref = ref.reshape(ref.shape[0], -1, query.shape[1], query.shape[-1]).transpose(1, 2)
                scores = query @ ref.transpose(-1, -2) * query.shape[-1] ** -0.5
                self._targets[site.layer] = torch.softmax(scores.float(), dim=-1).mean(1)  # (rows, pixels, tokens)
        return key, value

    def wants_probabilities(self, site):
        return self._reads(site)

    def probabilities(self, site, probs):
        maps = probs.float().mean(1)  # (rows, pixels, tokens), averaged over heads
        if self.reference is not None:
            error = (maps - self._targets.pop(site.layer)).square()
            if self.reduction == "mean":
                self.terms.append(error.mean((-1, -2)))
            else:
                self.terms.append(error.sum((-1, -2)))
        if self.column is not None:
            self.maps.append(maps[..., self.column].detach())
        return probs

    def take_loss(self) -> torch.Tensor:
        """The attention loss of the calls since the last take, per row (mean over the loss layers)."""
        if not self.terms:
            raise RuntimeError("no cross-attention layer at the attention loss's levels was called")
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean(0)

    def take_maps(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps
