"""modules.devices on a CPU host: fp32 everywhere, so autocast is a null context as in the webui."""
from __future__ import annotations

import contextlib

import torch
from modules._variant import FLAGS

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
if FLAGS.infotext_utils:
    dtype_inference = torch.float32
unet_needs_upcast = False
torch_gc_calls = 0


class NansException(Exception):
    pass


def autocast(disable: bool = False):
    """torch.autocast on CUDA in the webui; a null context when fp32 is in use (always here)."""
    if disable or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda")


def without_autocast(disable: bool = False):
    if torch.is_autocast_enabled() and not disable:
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def cond_cast_unet(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(dtype_unet) if unet_needs_upcast else tensor


def cond_cast_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if unet_needs_upcast else tensor


def torch_gc() -> None:
    global torch_gc_calls
    torch_gc_calls += 1


def test_for_nans(x: torch.Tensor, where: str) -> None:
    if torch.all(torch.isnan(x)).item():
        raise NansException(f"A tensor with all NaNs was produced in {where}.")


def get_optimal_device() -> torch.device:
    return cpu


def has_mps() -> bool:
    return False
