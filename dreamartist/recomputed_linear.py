"""``F.linear(x, weight)`` whose backward pass recomputes ``x`` from tensors autograd keeps anyway, where it can.

A LoRA's down-projection needs its layer's input for its gradient, where the frozen layer itself keeps none: on SD
1.5 at 512 px keeping them cost 0.5 GiB, 7 % of a step's peak. Most adapted layers take their input straight from
an operation that keeps what makes it again:
- a feed-forward's second layer takes a product, GEGLU's ``h * gelu(g)`` or CLIP's ``h * sigmoid(1.702 h)`` (four
  times the block's width); the multiplication keeps both factors, and their product is the same bits again;
- attention and a feed-forward's first layer take a LayerNorm's output; the norm keeps its input, mean and
  1/std, from which the output is computed again to rounding (the kernel's own order of operations is not
  public).
Any other input is kept as F.linear keeps it. So is every input inside a non-reentrant checkpoint, whose kept
tensors are handles to a recomputation (reading one there would run it).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

_off: contextvars.ContextVar[bool] = contextvars.ContextVar("dreamartist_recompute_off", default=False)


@contextlib.contextmanager
def keeping_inputs() -> Iterator[None]:
    """Inside the block every input is kept (a checkpointed function's passes)."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``F.linear(x[start:stop], weight)`` (rows along dimension 0), recomputing ``x`` for the backward pass."""
    recipe = _recipe(x)
    if recipe is None:
        return F.linear(x[start:stop], weight)
    make, kept = recipe
    # the kept tensors that have x's rows are cut like x (views: no copy); the others (norm weights) are whole
    rows = [k[start:stop] if k is not None and k.dim() == x.dim() else k for k in kept]
    return _Recomputed.apply(x[start:stop], weight, make, *rows)


def recipe(x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor | None]] | None:
    """How to make ``x`` again for a backward pass, and from which kept tensors; None where ``x`` must be kept."""
    return _recipe(x)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b


def _normalized(x, mean, rstd, weight, bias) -> torch.Tensor:
    y = (x - mean) * rstd  # mean and 1/std are float32 for any input: the kernel's accumulation type
    y = y * weight if weight is not None else y
    return (y + bias if bias is not None else y).to(x.dtype)


def _recipe(x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor | None]] | None:
    """How to make ``x`` again from what its own operation kept, if it is that operation's fresh output."""
    node = x.grad_fn if torch.is_grad_enabled() and not _off.get() else None
    if node is None or x._version != 0:
        return None
    kind = type(node).__name__
    try:
        if kind == "MulBackward0":
            make, kept = _product, [node._saved_self, node._saved_other]
            same_shape = kept
        elif kind == "NativeLayerNormBackward0" and tuple(node._saved_normalized_shape) == x.shape[-1:]:
            make = _normalized
            kept = [node._saved_input, node._saved_result1, node._saved_result2, node._saved_weight,
                    node._saved_bias]  # input, mean, 1/std, weight, bias
            same_shape = kept[:1]
        else:
            return None
    except RuntimeError:  # released already
        return None
    if not all(isinstance(k, torch.Tensor) and k.shape == x.shape and k.dtype == x.dtype for k in same_shape):
        return None
    return make, kept


class _Recomputed(torch.autograd.Function):
    """``F.linear(x, weight)`` keeping the tensors ``make`` makes ``x`` from, not ``x``. The forward is F.linear
    itself, so autocast casts as it would; the backward works in that output's dtype, as F.linear's does."""

    @staticmethod
    def forward(ctx, x, weight, make, *kept):
        out = F.linear(x, weight)
        ctx.make, ctx.dtypes = make, (x.dtype, weight.dtype)
        ctx.save_for_backward(weight, *kept)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, *kept = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            x = ctx.make(*kept).to(grad.dtype)
            grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(ctx.dtypes[1])
        return (grad_x, grad_weight, None) + (None,) * len(kept)
