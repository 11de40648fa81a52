"""backend.nn.unet: Neo's UNet call signature over a tiny diffusers UNet2DConditionModel, whose transformer blocks
add each residual in place, as Neo's do: onto the x their norm has just read (``x += n``) and onto the feed-forward's
output, and call their attention modules as Neo does (``attn(n, context=..., value=..., transformer_options=...)``,
keys from ``context``, values from ``value`` when given); the attention function is bound at import (Neo's
flash/Sage kernels have no backward)."""
from __future__ import annotations

import math

import torch
from backend.attention import attention_function  # bound at import, as in Neo
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock as _DiffusersTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor


class CrossAttention(Attention):
    """Neo's CrossAttention: to_q, to_k, to_v, to_out and heads; no scale attribute."""

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006  (Neo's)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context if value is None else value)
        out = attention_function(q, k, v, self.heads, mask)
        for part in self.to_out:  # diffusers' ModuleList of Neo's Sequential(Linear, Dropout)
            out = part(out)
        return out


class BasicTransformerBlock(_DiffusersTransformerBlock):
    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
        return self._forward(hidden_states, encoder_hidden_states=encoder_hidden_states)

    def _forward(self, x, encoder_hidden_states=None, **kwargs):
        context = encoder_hidden_states
        n = self.norm1(x)
        n = self.attn1(n, context=None, value=None, transformer_options={})
        x += n
        n = self.norm2(x)
        n = self.attn2(n, context=context, value=None, transformer_options={})
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip  # onto the feed-forward's output, in place
        return x


class Timestep(torch.nn.Module):
    """SDXL's embedder of each size number: the sinusoidal timestep embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class IntegratedUNet2DConditionModel(torch.nn.Module):
    """``adm_in_channels`` (SDXL): the width of the "vector" ``y``, added to the time embedding."""

    def __init__(self, context_dim: int, adm_in_channels: int | None = None):
        super().__init__()
        adm = {} if adm_in_channels is None else dict(class_embed_type="projection",
                                                      projection_class_embeddings_input_dim=adm_in_channels)
        self.unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=context_dim, attention_head_dim=4, norm_num_groups=4, **adm)
        self.unet.set_attn_processor(AttnProcessor())
        for module in self.modules():
            if type(module) is _DiffusersTransformerBlock:
                module.__class__ = BasicTransformerBlock
                module.checkpoint = False  # an instance flag, as Neo's blocks set it
            elif type(module) is Attention:
                del module.scale  # Neo's has none
                module.__class__ = CrossAttention

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        transformer_options["original_shape"] = list(x.shape)  # Neo writes into the dict it is given
        return self.unet(x, timesteps, encoder_hidden_states=context, class_labels=y).sample
