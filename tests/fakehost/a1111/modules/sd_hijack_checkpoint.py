"""modules.sd_hijack_checkpoint: gradient checkpointing by replacing ldm block forwards at class level."""
from __future__ import annotations

import torch.utils.checkpoint
from ldm.models import BasicTransformerBlock, ResBlock

_originals: dict[type, object] = {}


def _checkpointed(original):
    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(original, self, *args, use_reentrant=False, **kwargs)

    return forward


def add() -> None:
    if _originals:
        return
    for cls in (BasicTransformerBlock, ResBlock):
        _originals[cls] = cls.forward
        cls.forward = _checkpointed(cls.forward)


def remove() -> None:
    for cls in list(_originals):
        del cls.forward  # the stand-in classes inherit their forward; removing the patch restores it
        del _originals[cls]
