"""modules.sd_hijack_checkpoint: gradient checkpointing by replacing ldm block forwards at class level."""
from __future__ import annotations

import torch.utils.checkpoint
from ldm.models import BasicTransformerBlock, ResBlock

_originals: dict[type, object] = {}


def _checkpointed(original):
    def forward(self, *args, **kwargs):
        # The webui passes no use_reentrant: torch 2.0/2.1 then checkpoint reentrantly, which lets gradients
        # through only to inputs that require them and only through a plain .backward().
        # Reentrant checkpointing takes no keyword arguments: the diffusers blocks' keywords travel positionally.
        names = list(kwargs)

        def run(*flat):
            return original(self, *flat[:len(args)], **dict(zip(names, flat[len(args):], strict=True)))

        return torch.utils.checkpoint.checkpoint(run, *args, *kwargs.values(), use_reentrant=True)

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
