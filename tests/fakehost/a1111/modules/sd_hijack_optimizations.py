"""modules.sd_hijack_optimizations: cross-attention optimisations replace CrossAttention.forward at class level.

Each forward takes ldm's arguments (x, context=None, mask=None, **kwargs), as the webui's do. Two stand-ins: SDP
(the webui's "sdp - scaled dot product") and Doggettx's split attention (queries in slices, an explicit softmax
each); the webui ranks Doggettx above SDP for "Automatic", the stand-in below it so that "Automatic" stays SDP.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from ldm.models import CrossAttention

_sdp = AttnProcessor2_0()


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    return _sdp(self, x, context, mask)


def split_cross_attention_forward(self, x, context=None, mask=None, **kwargs):
    h = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    k, v = self.to_k(context), self.to_v(context)
    b, n, inner = q.shape
    d = inner // h
    q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2).reshape(b * h, -1, d) for t in (q, k, v))
    out = torch.empty_like(q)
    size = max(1, q.shape[1] // 2)
    for i in range(0, q.shape[1], size):
        scores = torch.einsum("b i d, b j d -> b i j", q[:, i:i + size], k) * self.scale
        out[:, i:i + size] = torch.einsum("b i j, b j d -> b i d", scores.softmax(dim=-1), v)
    out = out.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, inner)
    return self.to_out[1](self.to_out[0](out))


class SdOptimization:
    name: str = ""
    label: str | None = None
    cmd_opt: str | None = None
    priority: int = 0

    def title(self) -> str:
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self) -> bool:
        return True

    def apply(self) -> None:
        pass

    def undo(self) -> None:
        if "forward" in CrossAttention.__dict__:
            del CrossAttention.forward  # back to the plain attention the class inherits


class SdOptimizationSdp(SdOptimization):
    name = "sdp"
    label = "scaled dot product"
    cmd_opt = "opt_sdp_attention"
    priority = 80

    def apply(self) -> None:
        CrossAttention.forward = scaled_dot_product_attention_forward


class SdOptimizationDoggettx(SdOptimization):
    name = "Doggettx"
    cmd_opt = "opt_split_attention"
    priority = 10

    def apply(self) -> None:
        CrossAttention.forward = split_cross_attention_forward
