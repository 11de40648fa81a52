"""One layer's adapters computed together as batched matmuls, where each acts on one block of the batch's rows,
the blocks equal and in order: a training call's [S^n; S^p] rows, a CFG call's [cond; uncond].

Made one adapter at a time (``Lora.delta``), a training step's updates took about 24 kernels per adapter and layer,
forward and backward, and the cut rows' gradients were padded back to the input's full size; on a GPU at two rows
those launches cost more than the layer's own work. Here training is one autograd node per layer, which returns the
layer's output with the updates added: each step of the LoRA one batched matmul over the blocks, the last one adding
into the output (with dropout, one mask over all blocks, applied as the update is added), the input's gradient
whole, and the input made again for the backward pass where it can be (``recomputed_linear``). The weights' stacks
in the model's dtype are made again in the backward pass too, not kept through the step (76 MiB of a float16 step's
peak on SD 1.5 at 512 px). Generation is two kernels per layer for all blocks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import recomputed_linear, seeded_dropout


def added(output: torch.Tensor, x: torch.Tensor, downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor],
          scale: float, levels: int) -> torch.Tensor:
    """``output`` plus the update ``scale * up_i(down_i(x_i))`` of each block ``x_i`` of ``x``'s rows, in
    ``output``'s dtype, with dropout at ``levels`` (``seeded_dropout``) on the update. Every ``down`` has the same
    shape, as every ``up``."""
    make, kept = recomputed_linear.recipe(x) or (None, [])
    return _Blocks.apply(output, x, (make, len(downs), scale, levels), *downs, *ups, *kept)


def stacked(downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor],
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation's weights, made once per generation: the downs (n, in, rank) and ups (n, rank, out), each
    transposed for its matmul, in ``dtype``."""
    return _stacked(downs, dtype).transpose(1, 2).contiguous(), _stacked(ups, dtype).transpose(1, 2).contiguous()


def add_to(output: torch.Tensor, x: torch.Tensor, downs: torch.Tensor, ups: torch.Tensor, scale: float) -> None:
    """Generation (no gradient, no dropout): each block of ``output``'s rows += ``scale * up_i(down_i(x_i))``, in
    place, with the weights ``stacked`` in the output's dtype: two kernels for all blocks (three where ``x`` is in
    another dtype, as under autocast)."""
    n = downs.shape[0]
    x = x if x.dtype == output.dtype else x.to(output.dtype)
    if x.dim() != 3 or x.shape[0] != n:  # several rows to a block: the blocks as the matmuls' batch
        x, output = x.reshape(n, -1, x.shape[-1]), output.view(n, -1, output.shape[-1])
    output.baddbmm_(torch.bmm(x, downs), ups, alpha=scale)


class _Blocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, x, plan, *tensors):
        make, n, scale, levels = plan
        downs, ups, kept = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        dtype = output.dtype
        down, up = _stacked(downs, dtype), _stacked(ups, dtype)  # (n, rank, in), (n, out, rank)
        x_used = x.to(dtype)
        h = _scaled_bmm(x_used.reshape(n, -1, x.shape[-1]), down.transpose(1, 2), scale)
        rows = output.reshape(n, -1, output.shape[-1])
        ctx.seed = seeded_dropout.new_seed() if levels < seeded_dropout.LEVELS else None
        # the result is a tensor of its own, not a view: a host may add its residual onto it in place (Forge Neo's
        # feed-forward output), which autograd forbids on a view made inside a custom Function
        result = output.new_empty(output.shape)
        added = result.view(rows.shape)
        if ctx.seed is None:
            torch.baddbmm(rows, h, up.transpose(1, 2), out=added)
        else:
            torch.bmm(h, up.transpose(1, 2), out=added)  # the update in the result's memory, then the rows added
            torch.addcmul(rows, added, seeded_dropout.kept(added, levels, ctx.seed), out=added)
        ctx.plan, ctx.x_meta, ctx.kept = plan, (x.shape, x.dtype), len(kept)
        # the weights uncast, their casts made again in the backward pass rather than kept through the step (the
        # adapters' size in the model's dtype, per branch); the input as multiplied, where it cannot be made again
        ctx.save_for_backward(h, *downs, *ups, *(kept if make else [x_used]))
        return result

    @staticmethod
    def backward(ctx, grad):
        make, n, scale, levels = ctx.plan
        h, *saved = ctx.saved_tensors
        downs, ups, kept = saved[:n], saved[n:2 * n], saved[2 * n:]
        dtype = h.dtype
        down, up = _stacked(downs, dtype), _stacked(ups, dtype)
        grad_rows = grad.reshape(n, -1, up.shape[1])
        if ctx.seed is not None:
            grad_rows = grad_rows * seeded_dropout.kept(grad_rows, levels, ctx.seed)
        grad_up = torch.bmm(grad_rows.transpose(1, 2), h).to(downs[0].dtype)
        grad_h = _scaled_bmm(grad_rows, up, scale)
        (x_shape, x_dtype), grad_x = ctx.x_meta, None
        if ctx.needs_input_grad[1]:
            grad_x = torch.bmm(grad_h, down).view(x_shape).to(x_dtype)
        x = (make(*kept) if make else kept[0]).to(dtype).reshape(n, -1, down.shape[2])
        grad_down = torch.bmm(grad_h.transpose(1, 2), x).to(downs[0].dtype)
        return (grad, grad_x, None, *grad_down.unbind(), *grad_up.unbind()) + (None,) * ctx.kept


def _stacked(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors stacked in ``dtype``: one kernel, the cast riding on the copy."""
    if tensors[0].dtype == dtype:
        return torch.stack(tensors)
    return torch.stack(tensors, out=tensors[0].new_empty((len(tensors), *tensors[0].shape), dtype=dtype))


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (a @ b)`` batched, as one kernel: baddbmm with beta 0 reads nothing of its (empty) input."""
    return torch.baddbmm(a.new_empty((1, 1, 1)), a, b, beta=0.0, alpha=scale)
