"""Prompt-following of the toy model, scored by the attribute classifier (the base-model bar of the model card)."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from dreamartist.backend import Backend, WordVectors
from dreamartist.sampling import sample

from .models import IMAGE_SIZE
from .world import ATTRIBUTES, Scene, caption

GUIDANCE = 4.0  # CFG scale for toy-model samples; chosen on training scenes, never on held-out ones
SAMPLE_STEPS = 20  # DDIM steps
SAMPLES_PER_PROMPT = 4


def generate(backend: Backend, prompt: str, negative_prompt: str = "", words: WordVectors | None = None,
             guidance: float | str = GUIDANCE, samples: int = SAMPLES_PER_PROMPT, seed: int = 0,
             steps: int = SAMPLE_STEPS, patches: Mapping | None = None,
             labels: tuple = ("neg", "pos")) -> list[Image.Image]:
    """``samples`` 64x64 images for one prompt through the project's own DDIM sampler (``patches`` and ``labels``:
    a pair's adapters, as dreamartist.sampling.sample takes them)."""
    return sample(backend, prompt, negative_prompt, words, guidance=guidance, steps=steps, width=IMAGE_SIZE,
                  height=IMAGE_SIZE, seed=seed, batch=samples, patches=patches, labels=labels)


def scene_accuracy(backend: Backend, classifier, scenes: Sequence[Scene], guidance: float = GUIDANCE,
                   samples: int = SAMPLES_PER_PROMPT, steps: int = SAMPLE_STEPS, seed: int = 0,
                   progress: bool = False) -> dict[str, float]:
    """Per-attribute accuracy (and 'all': every attribute right) of samples for each scene's caption."""
    hits = torch.zeros(len(ATTRIBUTES))
    whole, total = 0.0, 0
    for i, scene in enumerate(tqdm(scenes, desc="prompts", unit="prompt", disable=not progress)):
        images = generate(backend, caption(scene), guidance=guidance, samples=samples, seed=seed + i, steps=steps)
        correct = classifier.predict(images) == torch.tensor(scene.labels())
        hits += correct.float().sum(dim=0)
        whole += correct.all(dim=1).float().sum().item()
        total += len(images)
    scores = {a: round(float(h) / total, 4) for a, h in zip(ATTRIBUTES, hits)}
    scores["all"] = round(whole / total, 4)
    return scores


def unit_noise(unit: tuple[int, int], prompt: int, samples: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of a benchmark unit's prompt: the same for every method, checkpoint and CFG."""
    digest = hashlib.sha256(f"{unit}:{prompt}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:7], "big"))
    return torch.randn((samples, *shape), generator=generator)
