"""Forge's modules.devices: a thin shim over backend.memory_management; autocast is always a null context."""
from __future__ import annotations

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
unet_needs_upcast = False


class NansException(Exception):
    pass


def autocast(disable: bool = False):
    return contextlib.nullcontext()


def without_autocast(disable: bool = False):
    return contextlib.nullcontext()


def cond_cast_unet(tensor):
    return tensor


def cond_cast_float(tensor):
    return tensor


def torch_gc() -> None:
    pass


def test_for_nans(x, where) -> None:
    pass


def get_optimal_device() -> torch.device:
    return cpu
