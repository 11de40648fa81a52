"""Identity mode (Beyond Inserting, sec. III-C): one identity written as per-stage key/value tokens.

A small trainable block (ProSpect's: self-attention, attention over the same fixed input, a gated feed-forward) maps
the fixed embedding of a class word ("person") to S stages x {K, V} token vectors. Stage s(t) = floor(t * S / T),
clamped to [0, S-1], picks the pair used at timestep t: every cross-attention then reads its keys from the prompt
encoded with the stage's K token and its values from the prompt encoded with its V token. Without the K/V split
one token per stage serves both.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

K, V = 0, 1  # index of the key and the value token in a stage pair
TRAIN_TIMESTEPS = 1000


def stage_of(t: int | torch.Tensor, stages: int, timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """s(t) = floor(t * S / T), clamped to [0, S-1] (ProSpect's ``int(t * stages / 1000)``); stage 0 is the least
    noisy, so it acts last while sampling."""
    t = torch.as_tensor(t)
    return torch.div(t.long() * stages, timesteps, rounding_mode="floor").clamp(0, stages - 1)


def stage_bounds(stages: int, timesteps: int = TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """The first timestep of each stage and T: "0,200,400,600,800,1000" for S = 5, written into the files."""
    return tuple(math.ceil(s * timesteps / stages) for s in range(stages)) + (timesteps,)


@dataclass
class IdentityTokens:
    """An identity's token vectors: encoder key -> (S, 2, dim), [s, K] and [s, V] (equal without the K/V split)."""

    tokens: Mapping[str, torch.Tensor]

    @property
    def stages(self) -> int:
        return next(iter(self.tokens.values())).shape[0]

    def vectors(self, stage: int, which: int) -> dict[str, torch.Tensor]:
        """The one-vector pseudo-word of ``stage``'s K or V token, per encoder: (1, dim)."""
        return {key: t[stage, which].unsqueeze(0) for key, t in self.tokens.items()}

    def stage_mean_key(self) -> dict[str, torch.Tensor]:
        """The lossy stand-in for hosts without identity mode: the mean K token, (1, dim) per encoder."""
        return {key: t[:, K].mean(0, keepdim=True) for key, t in self.tokens.items()}


class _Attention(nn.Module):
    """ldm's CrossAttention (no biases on q, k, v; output projection then dropout)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * nn.functional.gelu(gate)


class IdentityModule(nn.Module):
    """ProSpect's ``TransformerBlock(dim, 8 heads of 64, dropout 0.1, gated FF)`` whose feed-forward writes
    ``outputs`` token vectors of ``dim``: attn1 (self), attn2 (the same fixed input as context), FF; its input is the
    class word's embedding, fixed. ``dims`` splits each output vector per text encoder (SDXL: clip_l, clip_g)."""

    def __init__(self, init: Mapping[str, torch.Tensor], outputs: int, heads: int = 8, head_dim: int = 64,
                 dropout: float = 0.1, ff_mult: int = 4):
        super().__init__()
        self.keys = tuple(init)
        self.dims = tuple(int(init[k].shape[-1]) for k in self.keys)
        dim = sum(self.dims)
        self.outputs = outputs
        self.register_buffer("initial", torch.cat([init[k].reshape(1, -1).float() for k in self.keys], -1))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, head_dim, dropout)
        self.attn2 = _Attention(dim, heads, head_dim, dropout)
        self.ff = nn.Sequential(_GEGLU(dim, dim * ff_mult), nn.Dropout(dropout), nn.Linear(dim * ff_mult,
                                                                                          outputs * dim))

    def forward(self) -> dict[str, torch.Tensor]:
        """encoder key -> (outputs, dim of that encoder)."""
        x = self.initial.unsqueeze(0)  # (1, 1, dim)
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=self.initial.unsqueeze(0)) + x
        out = self.ff(self.norm3(x)).reshape(self.outputs, sum(self.dims))
        return dict(zip(self.keys, out.split(self.dims, dim=-1)))


def as_tokens(outputs: Mapping[str, torch.Tensor], stages: int, kv_split: bool) -> IdentityTokens:
    """The module's outputs, (S * 2, dim) with the split or (S, dim) without, as (S, 2, dim) per encoder."""
    if kv_split:
        return IdentityTokens({k: o.reshape(stages, 2, -1) for k, o in outputs.items()})
    return IdentityTokens({k: o.unsqueeze(1).expand(-1, 2, -1) for k, o in outputs.items()})
