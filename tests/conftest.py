"""Shared fixtures: the stand-in webui hosts (tests/fakehost) and the tiny seeded random model."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from fakehost.fixtures import host, host_classic, host_forge, host_neo, host_reforge, host_v160, host_v1101  # noqa: F401  (registered as fixtures)

# Toy-sized models gain nothing from intra-op threads, and on a busy 2-core runner the thread pool's
# spin-waiting makes each tiny UNet call about 100 times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def random_backend():
    """The standalone demo backend (toy-size SD1, seed 0, on the CPU). Tests must leave it as they found it."""
    pytest.importorskip("diffusers")  # absent where only the core's torch is installed (test_torch_compat)
    from dreamartist.standalone import build_random_backend

    return build_random_backend(seed=0, device="cpu")


@pytest.fixture
def references():
    """One prepared 64 px reference (an orange box), for host training tests that define none of their own."""
    from PIL import Image

    from dreamartist.images import prepare_reference

    image = Image.new("RGB", (64, 64), (200, 120, 40))
    image.paste((30, 60, 200), (16, 8, 48, 40))
    return [prepare_reference(image, 64, 64, caption="orange box")]


@contextlib.contextmanager
def _benchmark(name: str):
    """benchmarks/<name>.py as a module, registered in sys.modules while in use (dataclasses look their module up
    there)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def editing():
    with _benchmark("editing") as module:
        yield module


@pytest.fixture(scope="module")
def identity_bench():
    with _benchmark("identity") as module:
        yield module
