"""Rendered data sets of the toy world: images, attribute labels and the scene of each image."""
from __future__ import annotations

import contextlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .render import render_array
from .world import ATTRIBUTES, VALUES, Scene


@dataclass
class RenderedSet:
    images: np.ndarray  # (N, 64, 64, 3) uint8
    labels: np.ndarray  # (N, 4) int64, per ATTRIBUTES

    def __len__(self) -> int:
        return len(self.images)

    def scene(self, index: int) -> Scene:
        return Scene(*(VALUES[a][int(i)] for a, i in zip(ATTRIBUTES, self.labels[index])))

    def save(self, path: Path) -> None:
        """One .npz file, written under a temporary name and renamed so a half-written set is never read."""
        temporary = path.with_suffix(".partial.npz")
        np.savez(temporary, images=self.images, labels=self.labels)
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> RenderedSet:
        with np.load(path) as data:
            return cls(images=data["images"], labels=data["labels"])


def render_set(scenes: list[Scene], count: int, seed: int, progress: str = "", workers: int = 1) -> RenderedSet:
    """``count`` renders of scenes drawn uniformly from ``scenes``; the same seed gives the same set, whatever the
    number of worker processes (each render has its own seed, drawn up front)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scenes), count)
    render_seeds = rng.integers(0, 2**62, count)
    jobs = [(scenes[p], int(s)) for p, s in zip(picks, render_seeds)]
    images = np.empty((count, 64, 64, 3), dtype=np.uint8)
    with contextlib.ExitStack() as stack:
        rendered = map(_render, jobs)
        if workers > 1:
            rendered = stack.enter_context(ProcessPoolExecutor(workers)).map(_render, jobs, chunksize=256)
        for i, image in enumerate(tqdm(rendered, total=count, desc=progress or "render", unit="img",
                                       disable=not progress, mininterval=2)):
            images[i] = image
    labels = np.array([scenes[p].labels() for p in picks], dtype=np.int64).reshape(count, len(ATTRIBUTES))
    return RenderedSet(images, labels)


def _render(job: tuple[Scene, int]) -> np.ndarray:
    return render_array(*job)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
