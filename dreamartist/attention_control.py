"""Reading and replacing what the UNet's attention layers compute, per layer, per batch row and per step.

Three parts, so that any host can plug in:

- ``Controller``: what a method wants. At every attention call it receives a ``Site`` (the layer's canonical name,
  self- or cross-attention, the step and the row labels the driving loop set, the layer's resolution level) with
  the head-split q, k, v, and returns the k, v to use; it may also ask for the probabilities and return others.
  ``RowInjection`` is the one general controller: copy one row's K/V or probabilities into another row for a
  window of steps at chosen layers (BARET's balanced attention, MasaCtrl, prompt-to-prompt replacement).
- ``attend``: attention with a controller, from head-split tensors. Fused scaled-dot-product attention unless the
  controller wants the probabilities, which are then formed explicitly.
- An installer per UNet implementation, exposed as a backend's ``controlled_attention(controller, calls)``: here
  the diffusers one (attention processors, restored on exit). The webui's ldm/sgm ``CrossAttention`` takes the
  same shape: an instance-level forward that projects q, k, v, calls ``attend`` and applies ``to_out``.

The loop that calls the UNet labels the rows and the step explicitly (``Calls.at``): sites never guess them from
call counts or batch halves, which break when a host splits or reorders its batch.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ModelError
from .layer_names import unet_name

SELF, CROSS = "self", "cross"


@dataclass(frozen=True)
class Site:
    """One attention call: where it is and which call of the driving loop it belongs to."""

    layer: str  # canonical name (dreamartist.layer_names), e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    kind: str  # SELF or CROSS
    step: int  # the step the driving loop set; -1 when it set none
    rows: tuple  # one label per batch row, as the driving loop set them; () when it set none
    level: int  # how many times this layer's grid is halved from the latent grid (0: latent resolution); -1 unknown
    module: object = field(default=None, compare=False, repr=False)  # the attention layer (its to_k, to_v, heads)

    def row(self, label: Hashable) -> int:
        """The batch index of the row labelled ``label``."""
        try:
            return self.rows.index(label)
        except ValueError:
            raise ValueError(f"no row labelled {label!r} at {self.layer} (rows {self.rows})") from None


class Controller:
    """Pass-through; a method overrides what it changes. Tensors are (batch, heads, tokens, head_dim); the
    probabilities (batch, heads, query tokens, key tokens). Return new tensors rather than writing into these."""

    def contexts(self, site: Site, key_context: torch.Tensor,
                 value_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A cross-attention's text states, (batch, tokens, dim), before ``to_k`` and ``to_v`` project them: the
        keys and the values may be read from different contexts (the identity mode's K/V split)."""
        return key_context, value_context

    def keys_values(self, site: Site, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return key, value

    def wants_probabilities(self, site: Site) -> bool:
        """True where ``probabilities`` must see this call (it costs an explicit softmax)."""
        return False

    def probabilities(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        return probs


def attend(controller: Controller, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v under ``controller``; ``scale`` None is 1/sqrt(head_dim)."""
    if site.rows and len(site.rows) != query.shape[0]:
        raise ValueError(f"{len(site.rows)} row labels for a batch of {query.shape[0]} at {site.layer}")
    key, value = controller.keys_values(site, query, key, value)
    default_scale = scale is None or math.isclose(scale, query.shape[-1] ** -0.5)
    if not controller.wants_probabilities(site):
        if default_scale:  # as diffusers calls it; the scale argument needs torch 2.1
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # float32 softmax: fp16 loses small weights
    return controller.probabilities(site, probs) @ value


# -- the general controller: copy rows into rows --------------------------------------------------------------
def step_window(start: float, end: float, steps: int) -> range:
    """The steps in the fraction window [start, end) of ``steps``: the first ceil(end * steps) steps when start is 0
    (prompt-to-prompt's convention). Rounded first, so that 0.3 of 50 is 15 steps, not 16."""
    return range(math.ceil(round(start * steps, 6)), math.ceil(round(end * steps, 6)))


# Which layers an injection acts on. "decoder": the decoder at the two finest resolutions (MasaCtrl's layers 10-15
# of SD 1.5); "coarse": every layer at half the latent resolution or below (the prompt-to-prompt notebook's
# self-attention scope, 32x32 and less at 512 px).
LAYER_SCOPES: dict[str, Callable[[Site], bool]] = {
    "all": lambda site: True,
    "decoder": lambda site: site.layer.startswith("up_blocks.") and 0 <= site.level <= 1,
    "coarse": lambda site: site.level >= 1,
}


@dataclass(frozen=True)
class Injection:
    """At ``kind`` sites in ``steps`` that ``layers`` accepts: for each (destination, source) pair of row labels,
    the destination row takes the source row's K and V (self-attention) or probabilities (cross-attention)."""

    kind: str
    pairs: tuple[tuple[Hashable, Hashable], ...]
    steps: range
    layers: Callable[[Site], bool] = LAYER_SCOPES["all"]

    def applies(self, site: Site) -> bool:
        return bool(site.rows) and site.kind == self.kind and site.step in self.steps and self.layers(site)

    def apply(self, site: Site, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` with the destination rows replaced by the source rows (read before any is written)."""
        index = torch.tensor([[site.row(dst), site.row(src)] for dst, src in self.pairs], device=tensor.device)
        return tensor.index_copy(0, index[:, 0], tensor.index_select(0, index[:, 1]))


class RowInjection(Controller):
    """K/V injections act on every call they apply to; probability injections form the probabilities there."""

    def __init__(self, injections: Sequence[Injection]):
        self.injections = tuple(injections)

    def _applying(self, site: Site, kinds: tuple[str, ...]) -> list[Injection]:
        return [i for i in self.injections if i.kind in kinds and i.applies(site)]

    def keys_values(self, site, query, key, value):
        for injection in self._applying(site, (SELF,)):
            key, value = injection.apply(site, key), injection.apply(site, value)
        return key, value

    def wants_probabilities(self, site):
        return bool(self._applying(site, (CROSS,)))

    def probabilities(self, site, probs):
        for injection in self._applying(site, (CROSS,)):
            probs = injection.apply(site, probs)
        return probs


# -- the driving loop's side ----------------------------------------------------------------------------------
class Calls:
    """What the loop driving the UNet says about the current call (its step and row labels), and the latent size
    the installer saw the UNet called with; every attention site of that call reads it."""

    def __init__(self) -> None:
        self.step, self.rows, self.latent_tokens = -1, (), 0

    @contextlib.contextmanager
    def at(self, step: int, rows: tuple = ()) -> Iterator[None]:
        self.step, self.rows = step, tuple(rows)
        try:
            yield
        finally:
            self.step, self.rows = -1, ()

    def site(self, layer: str, kind: str, tokens: int, module: object = None) -> Site:
        level = -1
        if self.latent_tokens and tokens:
            level = max(round(math.log2(self.latent_tokens / tokens) / 2), 0)
        return Site(layer, kind, self.step, self.rows, level, module)


@contextlib.contextmanager
def controlled(backend, controller: Controller) -> Iterator[Calls]:
    """``controller`` on ``backend``'s UNet for a with-block (removed on exit, also on error or interrupt); yields
    the ``Calls`` to label each UNet call with. The backend provides ``controlled_attention(controller, calls)``."""
    install = getattr(backend, "controlled_attention", None)
    if install is None:
        raise ModelError(f"The model {getattr(backend, 'model_name', '') or '(unnamed)'} does not let its attention "
                         "be controlled, which this method needs.")
    calls = Calls()
    with install(controller, calls):
        yield calls


# -- diffusers ------------------------------------------------------------------------------------------------
class DiffusersProcessor:
    """A diffusers attention processor (AttnProcessor2_0's computation) that attends through ``attend``."""

    def __init__(self, controller: Controller, calls: Calls, layer: str):
        self.controller, self.calls, self.layer = controller, calls, layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        kind = SELF if encoder_hidden_states is None else CROSS
        batch, tokens = hidden_states.shape[:2]
        if attention_mask is not None:
            length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        site = self.calls.site(self.layer, kind, tokens, attn)
        if encoder_hidden_states is None:
            key_context = value_context = hidden_states
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key_context, value_context = self.controller.contexts(site, encoder_hidden_states, encoder_hidden_states)
        key, value = attn.to_k(key_context), attn.to_v(value_context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        hidden_states = attend(self.controller, site, query, key, value, mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def diffusers_control(unet, controller: Controller, calls: Calls) -> Iterator[None]:
    """Every attention processor of a diffusers UNet2DConditionModel replaced by a ``DiffusersProcessor`` for the
    with-block; the original processors are set back on exit, also on error or interrupt."""
    original = dict(unet.attn_processors)
    processors = {}
    for path in original:
        layer = path.removesuffix(".processor")
        processors[path] = DiffusersProcessor(controller, calls, unet_name(layer) or layer)

    def record_latent_size(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        calls.latent_tokens = sample.shape[-2] * sample.shape[-1]

    handle = unet.register_forward_pre_hook(record_latent_size, with_kwargs=True)
    try:
        unet.set_attn_processor(processors)
        yield
    finally:
        handle.remove()
        unet.set_attn_processor(original)
