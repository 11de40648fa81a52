"""Positive and negative adapters (DreamArtist++): LoRA on chosen Linear layers, each acting only on the rows
of a batch that carry its label.

A LoRA adds ``strength * (alpha / rank) * up(down(x))`` to a layer's output. Here several adapters share the
layers and each acts on its own rows: the rows of a UNet (or text-encoder) call are labelled (``row_labels``),
and the forward hook of a layer adds each adapter's delta to the rows whose label names it, out of place, so
gradients reach exactly the adapter that acted on a row (both branches at once where they act on equal blocks of
rows, ``lora_blocks``). The hooks are module-level and removed when the
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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import lora_blocks, recomputed_linear, seeded_dropout

UNET, TEXT = "unet", "te"
# Which layers carry adapters (DreamArtist++ as HCP-Diffusion trains it): the UNet's attention keys and values
# and its feed-forward layers; the text encoder's self-attention and MLP.
TARGETS = {
    UNET: re.compile(r"\.(attn[12]\.to_[kv]|ff\.net\.(0\.proj|2))$"),
    TEXT: re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"),
}
Label = str | frozenset  # the adapter ids acting on one row ("" or an empty set: none)
Run = tuple[int, int]  # consecutive rows start..stop of a batch

_rows: contextvars.ContextVar[Sequence[Label] | None] = contextvars.ContextVar("dreamartist_rows", default=None)
# the arguments of each ``installed`` block in effect, which a checkpointed block's recomputation installs again
_installs: contextvars.ContextVar[tuple] = contextvars.ContextVar("dreamartist_installs", default=())


@dataclass
class Lora:
    """One layer's low-rank update: ``down`` (rank, in), ``up`` (out, rank), scaled by alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def placed(self, device: torch.device, dtype: torch.dtype) -> Lora:
        """On ``device`` in ``dtype``; trained tensors as they are, their cast stays in the graph (``delta``)."""
        if self.down.requires_grad or self.up.requires_grad:
            return self
        return Lora(self.down.to(device, dtype), self.up.to(device, dtype), self.alpha)

    def delta(self, x: torch.Tensor, runs: Sequence[Run], dim: int, strength: float = 1.0, dropout: float = 0.0,
              training: bool = False) -> list[torch.Tensor]:
        """``strength`` times the update for each run of rows of ``x`` along ``dim`` (one tensor per run).
        For the gradient the layer's input is made again where it can be (``recomputed_linear``), else kept
        itself, never a copy of some of its rows: a run of rows along dimension 0 is a view of it; rows along
        dimension 1 are strided, so those are cut from the rank-r projection of all rows instead. Dropout acts
        on the update, as in HCP-Diffusion's LoraLayer (DreamArtist++); every scale (strength, alpha / rank,
        1 / the share dropout keeps) acts on the rank-r projection, the smallest tensor."""
        levels = seeded_dropout.kept_levels(dropout if training else 0.0)
        keep = levels / seeded_dropout.LEVELS
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        if dim == 0:
            parts = [recomputed_linear.linear(x, down, start, stop) for start, stop in runs]
        else:
            h = recomputed_linear.linear(x, down, 0, len(x))
            parts = [h.narrow(dim, start, stop - start) for start, stop in runs]
        scale = strength * self.alpha / self.rank / keep
        out = [F.linear(part * scale, up) for part in parts]
        return [seeded_dropout.Mask.apply(o, levels) for o in out] if levels < seeded_dropout.LEVELS else out

    def add_to(self, output: torch.Tensor, x: torch.Tensor, run: Run, dim: int, strength: float) -> None:
        """Generation (no gradient, no dropout): ``output``'s rows in ``run`` += the update, in place. Rows along
        dimension 0 take two kernels, the scale riding on addmm's; on a GPU at a small batch each kernel's launch
        costs more than its work."""
        start, stop = run
        rows, scale = output.narrow(dim, start, stop - start), strength * self.alpha / self.rank
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        if dim == 0 and rows.is_contiguous() and rows.dtype == x.dtype:
            h = F.linear(x[start:stop], down)
            rows.view(-1, rows.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.T, alpha=scale)
        else:
            rows.add_(F.linear(x.narrow(dim, start, stop - start), down).mul_(scale) @ up.T)

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


def checkpoint(function, *args, **kwargs):
    """torch's non-reentrant gradient checkpoint of ``function``, recomputed with the adapters and row labels of
    the first pass: the backward pass that recomputes it runs after the blocks that installed and labelled them."""
    labels, installs = _rows.get(), _installs.get()

    def as_first_pass(*inner_args, **inner_kwargs):
        with contextlib.ExitStack() as stack:
            if _installs.get() is not installs:  # the recomputation: put the adapters back for it
                for install in installs:
                    stack.enter_context(installed(*install))
            stack.enter_context(row_labels(labels))
            stack.enter_context(recomputed_linear.keeping_inputs())
            return function(*inner_args, **inner_kwargs)
    return torch.utils.checkpoint.checkpoint(as_first_pass, *args, use_reentrant=False, **kwargs)


def _acts_on(label: Label, adapter_id: str) -> bool:
    return label == adapter_id if isinstance(label, str) else adapter_id in label


@contextlib.contextmanager
def installed(layers: Mapping[str, torch.nn.Module], adapters: Mapping[str, tuple[Adapter, float]],
              dropout: float = 0.0, training: bool = False) -> Iterator[None]:
    """``hooked`` for a block of model calls that a checkpointed block may recompute in the backward pass, after the
    block has ended (``checkpoint`` installs them again for it): a training step."""
    token = _installs.set((*_installs.get(), (layers, adapters, dropout, training)))
    try:
        with hooked(layers, adapters, dropout, training):
            yield
    finally:
        _installs.reset(token)


@contextlib.contextmanager
def hooked(layers: Mapping[str, torch.nn.Module], adapters: Mapping[str, tuple[Adapter, float]],
           dropout: float = 0.0, training: bool = False) -> Iterator[None]:
    """Forward hooks on ``layers`` adding each adapter's delta (times its strength) to the rows labelled with
    its id: ``adapters`` maps an id to (adapter, strength). Rows without a label, and calls made with no
    labels at all, are left alone. Every hook is removed when the block ends, in whatever thread it ends (a
    generation's hooks may be removed by the next generation's request)."""
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
    # each adapter where the layer's input is, moved once per install rather than on every call (adapters read
    # from files are CPU tensors: a copy to the GPU per layer and step otherwise); and a plan per labelling of the
    # rows, worked out on its first call rather than on every one
    placed: dict[tuple[torch.device, torch.dtype], list[tuple[str, Lora, float]]] = {}
    plans: dict[tuple, _Plan] = {}

    def hook(module, inputs, output):
        labels = _rows.get()
        if not labels:
            return None
        x = inputs[0]
        dim = _batch_dim(output, len(labels))
        plan = plans.get((labels, x.device, x.dtype))
        if plan is None:
            if (x.device, x.dtype) not in placed:
                placed[x.device, x.dtype] = [(i, lora.placed(x.device, x.dtype), s) for i, lora, s in acting]
            plan = plans[labels, x.device, x.dtype] = _Plan.of(placed[x.device, x.dtype], labels)
        if not torch.is_grad_enabled() and not (dropout and training):
            plan.add_to(output, x, dim)
            return output
        return plan.add_update(output, x, dim, dropout, training)
    return hook


@dataclass
class _Plan:
    """One layer's adapters on one labelling of the rows: the runs of rows each acts on, and, where each acts on one
    block of the rows, the blocks equal and covering the rows in order, with adapters of one shape, dtype and scale
    (a training call's [S^n; S^p] rows, a CFG call's [cond; uncond]), their LoRAs in the blocks' order and the scale
    (``lora_blocks``)."""

    runs: list[tuple[Lora, float, list[Run]]]
    blocks: tuple[list[Lora], float] | None
    # generation's weights by the output's dtype (autocast's, where the input is a float32 norm's output), of
    # adapters that do not train
    stacked: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, acting: list[tuple[str, Lora, float]], labels: Sequence[Label]) -> _Plan:
        runs = [(lora, strength, run) for adapter_id, lora, strength in acting
                if (run := _runs([_acts_on(label, adapter_id) for label in labels]))]
        return cls(runs, _blocks(runs, len(labels)))

    def add_to(self, output: torch.Tensor, x: torch.Tensor, dim: int) -> None:
        """Generation: each update straight into its rows of the layer's fresh output."""
        if self.blocks and dim == 0 and output.is_contiguous():
            loras, scale = self.blocks
            stacked = self.stacked.get(output.dtype)
            if stacked is None:
                stacked = lora_blocks.stacked([lora.down for lora in loras], [lora.up for lora in loras], output.dtype)
                if not any(t.requires_grad for t in stacked):  # trained tensors change with every step
                    self.stacked[output.dtype] = stacked
            lora_blocks.add_to(output, x, *stacked, scale)
            return
        for lora, strength, lora_runs in self.runs:
            for run in lora_runs:
                lora.add_to(output, x, run, dim, strength)

    def add_update(self, output: torch.Tensor, x: torch.Tensor, dim: int, dropout: float,
                   training: bool) -> torch.Tensor:
        """Training: ``output`` plus the updates, differentiable (in place into the update, a fresh tensor of ours:
        one full-size tensor fewer per layer)."""
        if self.blocks and dim == 0:
            loras, scale = self.blocks
            levels = seeded_dropout.kept_levels(dropout if training else 0.0)
            return lora_blocks.added(output, x, [lora.down for lora in loras], [lora.up for lora in loras],
                                     scale / (levels / seeded_dropout.LEVELS), levels)
        pieces = [piece for lora, strength, lora_runs in self.runs
                  for piece in zip(lora_runs, lora.delta(x, lora_runs, dim, strength, dropout, training))]
        for group in _disjoint(pieces):
            output = _assemble(group, output, dim).add_(output)
        return output


def _blocks(runs: list[tuple[Lora, float, list[Run]]], rows: int) -> tuple[list[Lora], float] | None:
    if not runs or any(len(lora_runs) != 1 for *_, lora_runs in runs):
        return None
    size = rows // len(runs)
    ordered = sorted(runs, key=lambda r: r[2])
    first, strength, _ = ordered[0]
    if size * len(runs) != rows or [r[2][0] for r in ordered] != [(i * size, (i + 1) * size) for i in range(len(runs))]:
        return None
    if not all(lora.down.shape == first.down.shape and lora.up.shape == first.up.shape and lora.alpha == first.alpha
               and lora.down.dtype == lora.up.dtype == first.down.dtype and s == strength for lora, s, _ in runs):
        return None
    return [r[0] for r in ordered], strength * first.alpha / first.rank


def _runs(flags: Sequence[bool]) -> list[Run]:
    """The runs of consecutive rows whose flag is set, as (start, stop)."""
    runs: list[Run] = []
    for row, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        elif flag:
            runs.append((row, row + 1))
    return runs


def _disjoint(pieces: list[tuple[Run, torch.Tensor]]) -> list[list[tuple[Run, torch.Tensor]]]:
    """The pieces in groups whose runs do not overlap, each in row order: one group when every row has at most
    one adapter (always in training), more where several pairs act on the same rows."""
    groups: list[list[tuple[Run, torch.Tensor]]] = []
    for piece in sorted(pieces, key=lambda p: p[0]):
        group = next((g for g in groups if g[-1][0][1] <= piece[0][0]), None)
        if group is None:
            groups.append(group := [])
        group.append(piece)
    return groups


def _assemble(group: list[tuple[Run, torch.Tensor]], output: torch.Tensor, dim: int) -> torch.Tensor:
    """One group's updates as a tensor of the output's shape, zero on the rows no run covers. Concatenation keeps
    nothing for the backward pass, which cuts each run's gradient out as a view (index_add would keep the updates,
    and index_select's backward scatters element by element on a CPU)."""
    parts, row = [], 0
    for (start, stop), update in group:
        if start > row:
            parts.append(output.new_zeros(_with_rows(output, dim, start - row)))
        parts.append(update.to(output.dtype))
        row = stop
    if row < output.shape[dim]:
        parts.append(output.new_zeros(_with_rows(output, dim, output.shape[dim] - row)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _with_rows(tensor: torch.Tensor, dim: int, rows: int) -> list[int]:
    shape = list(tensor.shape)
    shape[dim] = rows
    return shape


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
