"""One layer's adapters computed together as batched matmuls, where each acts on one block of the batch's rows,
the blocks equal and in order: a training call's [S^n; S^p] rows, a CFG call's [cond; uncond].

Made one adapter at a time (``Lora.delta``), a training step's updates took about 24 kernels per adapter and layer,
forward and backward, and the cut rows' gradients were padded back to the input's full size; on a GPU at two rows
those launches cost more than the layer's own work. Here training is one autograd node per layer: each step of the
LoRA one batched matmul over the blocks, dropout one mask over all of them, the input's gradient whole, and the
input made again for the backward pass where it can be (``recomputed_linear``). Generation is two kernels per
layer for all blocks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import recomputed_linear, seeded_dropout


def update(x: torch.Tensor, downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], scale: float, levels: int,
           dtype: torch.dtype) -> torch.Tensor:
    """The update ``scale * up_i(down_i(x_i))`` of each block ``x_i`` of ``x``'s rows, in ``dtype`` and in the
    rows' order, with dropout at ``levels`` (``seeded_dropout``). Every ``down`` has the same shape, as every
    ``up``."""
    make, kept = recomputed_linear.recipe(x) or (None, [])
    plan = (make, len(downs), scale, levels, dtype)
    return _Blocks.apply(x, plan, *downs, *ups, *kept)


def stacked(downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor],
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation's weights, made once per generation: the downs (n, in, rank) and ups (n, rank, out), each
    transposed for its matmul, in ``dtype``."""
    return (torch.stack(downs).transpose(1, 2).to(dtype).contiguous(),
            torch.stack(ups).transpose(1, 2).to(dtype).contiguous())


def add_to(output: torch.Tensor, x: torch.Tensor, downs: torch.Tensor, ups: torch.Tensor, scale: float) -> None:
    """Generation (no gradient, no dropout): each block of ``output``'s rows += ``scale * up_i(down_i(x_i))``, in
    place, with the weights ``stacked`` in the output's dtype: two kernels for all blocks (three where ``x`` is in
    another dtype, as under autocast)."""
    n = downs.shape[0]
    h = torch.bmm(x.to(output.dtype).reshape(n, -1, x.shape[-1]), downs)
    output.view(n, -1, output.shape[-1]).baddbmm_(h, ups, alpha=scale)


class _Blocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, *tensors):
        make, n, scale, levels, dtype = plan
        downs, ups, kept = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        down, up = torch.stack(downs).to(dtype), torch.stack(ups).to(dtype)  # (n, rank, in), (n, out, rank)
        x_used = x.to(dtype)
        h = _scaled_bmm(x_used.reshape(n, -1, x.shape[-1]), down.transpose(1, 2), scale)
        # written through a view into a tensor of the output's shape: the caller adds to it in place
        out = x.new_empty((*x.shape[:-1], up.shape[1]), dtype=dtype)
        torch.bmm(h, up.transpose(1, 2), out=out.view(n, -1, up.shape[1]))
        ctx.seed = seeded_dropout.new_seed() if levels < seeded_dropout.LEVELS else None
        if ctx.seed is not None:
            out.masked_fill_(seeded_dropout.dropped(out, levels, ctx.seed), 0.0)
        ctx.plan, ctx.x_meta, ctx.weight_dtype, ctx.kept = plan, (x.shape, x.dtype), downs[0].dtype, len(kept)
        # the weights as cast, as F.linear keeps its casts; uncast, their stacks are copies made again at less cost
        # than the memory (the adapters' size, per branch); the input as multiplied, where it cannot be made again
        ctx.cast = down.dtype != downs[0].dtype
        weights = (down, up) if ctx.cast else (*downs, *ups)
        ctx.save_for_backward(h, *weights, *(kept if make else [x_used]))
        return out

    @staticmethod
    def backward(ctx, grad):
        make, n, scale, levels, dtype = ctx.plan
        h, *saved = ctx.saved_tensors
        if ctx.cast:
            (down, up), kept = saved[:2], saved[2:]
        else:
            down, up, kept = torch.stack(saved[:n]), torch.stack(saved[n:2 * n]), saved[2 * n:]
        if ctx.seed is not None:
            grad = grad.masked_fill(seeded_dropout.dropped(grad, levels, ctx.seed), 0.0)
        grad = grad.to(dtype).reshape(n, -1, up.shape[1])
        grad_up = torch.bmm(grad.transpose(1, 2), h).to(ctx.weight_dtype)
        grad_h = _scaled_bmm(grad, up, scale)
        (x_shape, x_dtype), grad_x = ctx.x_meta, None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_h, down).view(x_shape).to(x_dtype)
        x = (make(*kept) if make else kept[0]).to(dtype).reshape(n, -1, down.shape[2])
        grad_down = torch.bmm(grad_h.transpose(1, 2), x).to(ctx.weight_dtype)
        return (grad_x, None, *grad_down.unbind(), *grad_up.unbind()) + (None,) * ctx.kept


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (a @ b)`` batched, as one kernel: baddbmm with beta 0 reads nothing of its (empty) input."""
    return torch.baddbmm(a.new_empty((1, 1, 1)), a, b, beta=0.0, alpha=scale)
