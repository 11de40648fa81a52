"""Positive and negative adapters (DreamArtist++): LoRA on chosen Linear layers, each acting only on the rows
of a batch that carry its label.

A LoRA adds ``strength * (alpha / rank) * up(down(x))`` to a layer's output. Here several adapters share the
layers and each acts on its own rows: the rows of a UNet (or text-encoder) call are labelled (``row_labels``),
and the forward hook of a layer adds each adapter's delta to the rows whose label names it, out of place, so
gradients reach exactly the adapter that acted on a row. The hooks are module-level and removed when the
``installed`` block ends (also on error), so they coexist with class-level patches such as the webui's
built-in Lora, which change the layer's own output.

Layers are named canonically, as kohya's LoRA files name them after the diffusers modules
("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", "text_model.encoder.layers.0.mlp.fc1"); each
backend maps its own modules to these names (``Backend.adapter_layers``).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNET, TEXT = "unet", "te"
# Which layers carry adapters (DreamArtist++ as HCP-Diffusion trains it): the UNet's attention keys and values
# and its feed-forward layers; the text encoder's self-attention and MLP.
TARGETS = {
    UNET: re.compile(r"\.(attn[12]\.to_[kv]|ff\.net\.(0\.proj|2))$"),
    TEXT: re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"),
}
Label = str | frozenset  # the adapter ids acting on one row ("" or an empty set: none)

_rows: contextvars.ContextVar[Sequence[Label] | None] = contextvars.ContextVar("dreamartist_rows", default=None)


@dataclass
class Lora:
    """One layer's low-rank update: ``down`` (rank, in), ``up`` (out, rank), scaled by alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, x: torch.Tensor, dropout: float = 0.0, training: bool = False,
              rows: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
        """The update for ``x``, or for its ``rows`` along ``dim`` only. The rank-r projection runs on every row
        and the rows are picked after it: autograd then keeps the layer's own input, not a copy of its rows.
        Dropout acts on the update, as in HCP-Diffusion's LoraLayer (DreamArtist++)."""
        h = F.linear(x, self.down.to(x.device, x.dtype))
        if rows is not None:
            h = h.index_select(dim, rows)
        out = F.linear(h, self.up.to(x.device, x.dtype)) * (self.alpha / self.rank)
        return F.dropout(out, dropout, training) if dropout else out


Adapter = Mapping[str, Lora]  # canonical layer name -> its LoRA


def unet_rank(out_features: int, ratio: float) -> int:
    """The UNet adapters' rank: a fixed share of the layer's width, at least 1."""
    return max(1, round(ratio * out_features))


def new_adapter(layers: Mapping[str, torch.nn.Module], rank_of, generator: torch.Generator) -> dict[str, Lora]:
    """A fresh adapter over ``layers``: ``down`` as torch initialises a Linear, ``up`` zero, so it starts as no
    change at all; alpha = rank (scale 1). ``rank_of(layer)`` gives each layer's rank."""
    adapter = {}
    for name, layer in layers.items():
        rank = rank_of(layer)
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)), Linear's own initialisation
        down = (torch.rand((rank, layer.in_features), generator=generator) * 2 - 1) * bound
        adapter[name] = Lora(down, torch.zeros(layer.out_features, rank), float(rank))
    return adapter


def target_layers(named: Mapping[str, torch.nn.Module], part: str) -> dict[str, torch.nn.Linear]:
    """The Linear layers of ``named`` (canonical name -> module) that adapters of ``part`` act on."""
    return {name: m for name, m in named.items() if isinstance(m, torch.nn.Linear) and TARGETS[part].search(name)}


@contextlib.contextmanager
def row_labels(labels: Sequence[Label] | None) -> Iterator[None]:
    """Label the rows of the model calls made inside the block (one label per batch row)."""
    token = _rows.set(tuple(labels) if labels is not None else None)
    try:
        yield
    finally:
        _rows.reset(token)


def current_rows() -> Sequence[Label] | None:
    return _rows.get()


def _acts_on(label: Label, adapter_id: str) -> bool:
    return label == adapter_id if isinstance(label, str) else adapter_id in label


@contextlib.contextmanager
def installed(layers: Mapping[str, torch.nn.Module], adapters: Mapping[str, tuple[Adapter, float]],
              dropout: float = 0.0, training: bool = False) -> Iterator[None]:
    """Forward hooks on ``layers`` adding each adapter's delta (times its strength) to the rows labelled with
    its id: ``adapters`` maps an id to (adapter, strength). Rows without a label, and calls made with no
    labels at all, are left alone. Every hook is removed when the block ends."""
    handles = []
    try:
        for name, layer in layers.items():
            acting = [(adapter_id, adapter[name], strength) for adapter_id, (adapter, strength) in adapters.items()
                      if name in adapter and strength]
            if acting:
                handles.append(layer.register_forward_hook(_hook(acting, dropout, training)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batch_dim(output: torch.Tensor, rows: int) -> int:
    """Where the rows are: dimension 0, or 1 for the sequence-first (L, N, D) layers of OpenCLIP's text tower in
    ldm/sgm. Dimension 0 wins a tie, which only a sequence-first call of exactly 77 prompts could get wrong (a
    training call has an even number of rows)."""
    if output.shape[0] == rows:
        return 0
    if output.ndim == 3 and output.shape[1] == rows:
        return 1
    raise RuntimeError(f"{rows} row labels for a batch of {output.shape[0]} rows")


def _hook(acting: list[tuple[str, Lora, float]], dropout: float, training: bool):
    def hook(module, inputs, output):
        labels = _rows.get()
        if not labels:
            return None
        dim = _batch_dim(output, len(labels))
        x = inputs[0]
        for adapter_id, lora, strength in acting:
            rows = [i for i, label in enumerate(labels) if _acts_on(label, adapter_id)]
            if not rows:
                continue
            if len(rows) == len(labels):
                output = output + strength * lora.delta(x, dropout, training).to(output.dtype)
                continue
            index = torch.tensor(rows, device=output.device)
            delta = strength * lora.delta(x, dropout, training, index, dim).to(output.dtype)
            output = output.index_add(dim, index, delta)
        return output
    return hook


def flatten(adapter: Mapping[str, Lora]) -> dict[str, torch.Tensor]:
    """An adapter as named tensors ("<layer>.lora_down", "<layer>.lora_up"): what the optimiser and files hold.
    alpha is not stored: it equals the rank."""
    flat = {}
    for name, lora in adapter.items():
        flat[f"{name}.lora_down"], flat[f"{name}.lora_up"] = lora.down, lora.up
    return flat


def unflatten(flat: Mapping[str, torch.Tensor]) -> dict[str, Lora]:
    """The inverse of ``flatten``; the tensors are used as they are (so gradients reach them)."""
    names = sorted({key.rsplit(".", 1)[0] for key in flat})
    return {name: Lora(flat[f"{name}.lora_down"], flat[f"{name}.lora_up"], float(flat[f"{name}.lora_down"].shape[0]))
            for name in names}
