"""Assertions tests make about a stand-in host: "the model is exactly as before", pairs on disk."""
from __future__ import annotations

from pathlib import Path

import torch

from dreamartist.fileops import WORK_DIR
from dreamartist.pairfiles import save_pair


def model_state(model: torch.nn.Module) -> dict:
    """Weights (cloned), requires_grad flags, train/eval modes, hook counts and gradients of ``model``."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()],
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    changed = [k for k in before["tensors"] if not torch.equal(before["tensors"][k], after["tensors"][k])]
    assert not changed, f"weights changed: {changed[:5]}"
    for key in ("requires_grad", "training", "hooks", "grads"):
        assert before[key] == after[key], key


def graphs_left() -> list[str]:
    """The live tensors that still hold an autograd graph after a collection (a run should leave none: a graph that
    holds itself through a tensor attribute is out of reach of Python's collector, and keeps its activations)."""
    import gc

    gc.collect()
    return [f"{tuple(t.shape)} {type(t.grad_fn).__name__}" for t in gc.get_objects()
            if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def class_forwards() -> dict:
    """The forward each patchable class defines itself (None when inherited): attention, checkpointing, Lora."""
    from ldm.models import BasicTransformerBlock, CrossAttention, ResBlock

    classes = (CrossAttention, BasicTransformerBlock, ResBlock, torch.nn.Linear, torch.nn.Conv2d)
    return {cls.__name__: cls.__dict__.get("forward") for cls in classes}


def write_pair(folder: Path, name: str, width: int = 32, key: str = "clip_l", seed: int = 0,
               lengths: tuple[int, int] = (2, 2)) -> list[Path]:
    """A DreamArtist pair with seeded random vectors, as the trainer writes it (SD1 stand-in width by default)."""
    generator = torch.Generator().manual_seed(seed)
    pos = {key: torch.randn(lengths[0], width, generator=generator)}
    neg = {key: torch.randn(lengths[1], width, generator=generator)}
    return save_pair(folder, name, pos, neg)


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` but the pairs' work folder and its lock files: what a run left behind."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.name != WORK_DIR and p.suffix != ".lock")
