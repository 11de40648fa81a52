"""Per-image scores of one-shot samples, from the attribute classifier's readings, and their shares.

A concept is its shape and its colour (``world.CONCEPT_ATTRIBUTES``). An image scores jointly: it is
*faithful* when both are the reference's, and it *follows* an edit (another background colour or pattern) only
when it is faithful too, so a pair cannot buy control by dropping the concept. *Leak* is counted only where the
concept is present: the share of faithful images that keep the reference's value of the attribute the prompt
changed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .world import ATTRIBUTES, CONCEPT_ATTRIBUTES, VALUES, Scene

# A usable pair: three of four samples show the concept, and half of the edits are followed with it intact.
FIDELITY_OK = 0.75
CONTROL_OK = 0.5
_INDEX = {a: i for i, a in enumerate(ATTRIBUTES)}


def faithful(read: torch.Tensor, reference: Scene) -> torch.Tensor:
    """(N,) bool: each image shows the reference's shape and colour. ``read`` is (N, attributes) of value indices."""
    columns = [_INDEX[a] for a in CONCEPT_ATTRIBUTES]
    want = torch.tensor([reference.labels()[c] for c in columns])
    return (read[:, columns] == want).all(dim=1)


def shows(read: torch.Tensor, attribute: str, value: str) -> torch.Tensor:
    """(N,) bool: each image shows ``value`` for ``attribute``."""
    return read[:, _INDEX[attribute]] == VALUES[attribute].index(value)


def edit_scores(read: torch.Tensor, reference: Scene, attribute: str, value: str) -> dict[str, list[bool]]:
    """Per image of a prompt asking ``attribute`` = ``value``: faithful, followed (faithful AND the value shown),
    asked (the value shown, concept or not) and, for the faithful images only, leaked (the reference's value
    kept)."""
    present = faithful(read, reference)
    asked = shows(read, attribute, value)
    leaked = shows(read, attribute, reference.value(attribute))
    return {"faithful": present.tolist(), "followed": (present & asked).tolist(), "asked": asked.tolist(),
            "leaked": leaked[present].tolist()}


def share(flags: Sequence[bool]) -> float:
    """The share of true flags; NaN for none (a leak over no faithful image is not zero, it is unknown)."""
    return sum(flags) / len(flags) if flags else math.nan


def identity_scores(read: torch.Tensor, reference: Scene, attribute: str | None = None,
                    value: str | None = None) -> dict[str, list[bool]]:
    """Identity mode's reading, per image of a prompt asking ``attribute`` = ``value`` (None: nothing asked): the
    identity is the reference's shape, kept in every prompt, and its colour, kept unless the prompt asks another;
    followed = the identity kept AND the asked value shown."""
    kept = shows(read, "shape", reference.shape)
    if attribute != "colour":
        kept = kept & shows(read, "colour", reference.colour)
    followed = kept & shows(read, attribute, value) if attribute else kept
    return {"identity": kept.tolist(), "followed": followed.tolist()}
