"""modules.sd_hijack_checkpoint: gradient checkpointing by replacing ldm block forwards at class level."""
from __future__ import annotations

import torch.utils.checkpoint
from ldm.models import BasicTransformerBlock, ResBlock

_originals: dict[type, object] = {}


def BasicTransformerBlock_forward(self, x, encoder_hidden_states=None, **kwargs):
    # The webui passes no use_reentrant: torch 2.0/2.1 then checkpoint reentrantly, which lets gradients
    # through only to inputs that require them and only through a plain .backward().
    run = lambda h, c: self._forward(h, encoder_hidden_states=c, **kwargs)  # noqa: E731
    return torch.utils.checkpoint.checkpoint(run, x, encoder_hidden_states, use_reentrant=True)


def ResBlock_forward(self, x, emb, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(self._forward, x, emb, use_reentrant=True)


def add() -> None:
    if _originals:
        return
    for cls, forward in ((BasicTransformerBlock, BasicTransformerBlock_forward), (ResBlock, ResBlock_forward)):
        _originals[cls] = cls.forward
        cls.forward = forward


def remove() -> None:
    for cls in list(_originals):
        cls.forward = _originals.pop(cls)
