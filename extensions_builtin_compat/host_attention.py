"""Attention control (dreamartist.attention_control) on the webui's own UNets: ldm's (SD1/SD2) and sgm's (SDXL), and
the Forge family's (ldm_patched's in reForge and Forge Classic, the backend's in Forge Neo), whose attention modules
have the same parts and take ldm's arguments plus a separate ``value`` context and ``transformer_options``.

The webui's cross-attention optimisations (SDP, xformers, sub-quadratic, split/Doggettx, InvokeAI, V1, none) all
replace ``CrossAttention.forward`` at class level. For one with-block, every attention module of the UNet gets an
instance-level ``forward``, which Python looks up before the class's: it projects q, k and v with the module's own
``to_q``/``to_k``/``to_v`` (after the webui's hypernetworks, as every optimisation does), splits the heads, attends
through ``attention_control.attend`` and applies ``to_out``. So it works whatever optimisation is active, and the
optimisation itself is never touched. A forward pre-hook on the diffusion model records the latent size the sites
read their resolution level from. All of it is removed on exit, also on error or interrupt; an instance forward
another extension had set is put back.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dreamartist.attention_control import CROSS, SELF, Calls, Controller, attend
from dreamartist.attributes import attributes_restored
from dreamartist.errors import ModelError
from dreamartist.layer_names import named_layers, unet_name

ATTENTION_PARTS = ("to_q", "to_k", "to_v", "to_out", "heads")


def attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Canonical name -> attention module (every ``attn1`` and ``attn2`` of the transformer blocks)."""
    return {name: module for name, module in named_layers(unet.named_modules(), unet_name).items()
            if name.rsplit(".", 1)[-1] in ("attn1", "attn2") and all(hasattr(module, a) for a in ATTENTION_PARTS)}


def _hypernetwork_contexts():
    """The webui's ``context -> (context_k, context_v)`` through the loaded hypernetworks, as its optimisations call
    it; the identity where the host has no hypernetworks."""
    try:
        from modules import shared
        from modules.hypernetworks import hypernetwork
    except ImportError:
        return lambda context: (context, context)
    return lambda context: hypernetwork.apply_hypernetworks(getattr(shared, "loaded_hypernetworks", []), context)


def _upcast() -> bool:
    """The webui's "Upcast cross attention layer to float32" setting (its SDP and xformers forwards follow it)."""
    try:
        from modules import shared
    except ImportError:
        return False
    return bool(getattr(shared.opts, "upcast_attn", False))


def controlled_forward(module: torch.nn.Module, layer: str, controller: Controller, calls: Calls):
    """The instance ``forward`` of one ldm/sgm/Forge CrossAttention under ``controller``; ldm's arguments and the Forge
    family's ``value`` (the values' context when it differs from the keys'); sgm's extra ``additional_tokens`` and
    ``n_times_crossframe_attn_in_self`` and Forge's ``transformer_options`` are ignored, as the hosts' own attention
    functions do."""
    contexts = _hypernetwork_contexts()
    upcast = _upcast()

    def forward(x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                value: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        kind = SELF if context is None else CROSS
        batch, tokens, _ = x.shape
        heads = module.heads
        query = module.to_q(x)
        site = calls.site(layer, kind, tokens, module)
        context_k, context_v = contexts(x if context is None else context)
        if value is not None:
            context_v = value
        if kind == CROSS:
            context_k, context_v = controller.contexts(site, context_k, context_v)
        key, value = module.to_k(context_k), module.to_v(context_v)
        head_dim = query.shape[-1] // heads
        query, key, value = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        dtype = query.dtype
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
        if mask is not None:  # ldm's (batch, ...) key mask, broadcast over heads and queries
            mask = mask.reshape(batch, 1, 1, -1)
        out = attend(controller, site, query, key, value, scale=getattr(module, "scale", None), mask=mask)
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(dtype)
        for part in module.to_out:  # ldm's Sequential(Linear, Dropout)
            out = part(out)
        return out

    return forward


@contextlib.contextmanager
def ldm_control(unet: torch.nn.Module, controller: Controller, calls: Calls) -> Iterator[None]:
    """Every attention module of ``unet`` (an ldm, sgm or Forge-family UNet) under ``controller`` for the
    with-block."""
    layers = attention_layers(unet)
    if not layers:
        raise ModelError("The loaded model's UNet has no attention layers this extension can control; load an SD1.x, "
                         "SD2.x or SDXL checkpoint.")

    def record_latent_size(_module, args, kwargs):
        sample = args[0] if args else kwargs["x"]
        calls.latent_tokens = sample.shape[-2] * sample.shape[-1]

    with attributes_restored((module, "forward") for module in layers.values()):
        handle = unet.register_forward_pre_hook(record_latent_size, with_kwargs=True)
        try:
            for layer, module in layers.items():
                module.forward = controlled_forward(module, layer, controller, calls)
            yield
        finally:
            handle.remove()
