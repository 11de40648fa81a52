"""Dropout on an adapter's update whose mask is drawn again from its seed in the backward pass, rather than kept.

F.dropout keeps its mask, as large as the layer's output: more memory than the adapters' own inputs. An element is
kept with probability ``levels`` / 65536: 1 - dropout to within 1 / 65536, and the update is scaled by the inverse
of that exact share. On a CPU it is kept when 16 random bits fall below ``levels``, four elements to one 64-bit draw
(a quarter of the draws torch.rand makes; there the draws are most of dropout's cost). On a GPU, whose two-row step
is bound by its launches, the mask is one bernoulli kernel rather than a draw and a comparison. The seed comes from
torch's global generator, so a seeded run repeats, and a checkpointed block's recomputation (which restores that
generator) draws the same mask.
"""
from __future__ import annotations

import torch

LEVELS = 2**16  # no dropout


def kept_levels(dropout: float) -> int:
    """How many of the 65536 levels keep an element at this dropout (all of them, ``LEVELS``, at 0)."""
    return min(LEVELS, max(1, round((1.0 - dropout) * LEVELS)))


def new_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)))


def kept(like: torch.Tensor, levels: int, seed: int) -> torch.Tensor:
    """True where an element is kept, with probability ``levels`` / 65536; on a CPU, where its 16 random bits, as a
    signed number, fall below ``levels`` - 2**15."""
    generator = torch.Generator(like.device).manual_seed(seed)
    if like.device.type == "cuda":
        return torch.empty(like.shape, dtype=torch.bool, device=like.device).bernoulli_(levels / LEVELS,
                                                                                        generator=generator)
    n = like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-2**63, None,
                                                                                    generator=generator)
    return (bits.view(torch.int16)[:n] < levels - 2**15).view(like.shape)


class Mask(torch.autograd.Function):
    """The mask (each element kept with probability ``levels`` / 65536, not rescaled) on ``update``, in place."""

    @staticmethod
    def forward(ctx, update: torch.Tensor, levels: int) -> torch.Tensor:
        # in place: the update is a fresh tensor that nothing else holds, and its matmul's backward does not need it
        ctx.levels, ctx.seed = levels, new_seed()
        ctx.mark_dirty(update)
        return update.mul_(kept(update, levels, ctx.seed))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * kept(grad, ctx.levels, ctx.seed), None
