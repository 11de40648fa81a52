"""Deterministic DDIM sampling with classifier-free guidance over any Backend (previews, `generate`).

The uncond rows carry the negative prompt (with S^n), the cond rows the prompt (with S^p); the guidance
scale may be a gamma schedule, so a preview samples with exactly the gamma the pair was trained with.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .attention_control import controlled
from .backend import Backend, Conditioning, WordVectors
from .gamma import GammaSchedule, parse_gamma
from .identity import IdentityTokens, K, V, stage_of
from .identity_control import IdentityControl
from .losses import guide, predict_eps, predict_z0


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DDIM timesteps with the webui's spacing (stride T // steps, offset 1), high to low: exactly ``steps`` of
    them, all below T (the webui adds one more when ``steps`` does not divide T)."""
    stride = max(num_timesteps // steps, 1)
    return [min(i * stride + 1, num_timesteps - 1) for i in range(min(steps, num_timesteps))][::-1]


def ddim_step(prediction_type: str, output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor,
              abar_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM move (eta 0) of ``x`` from noise level ``abar`` to ``abar_next`` (lower), given the
    (guided) model output at ``x``: sqrt(abar_next) z0_hat + sqrt(1 - abar_next) eps_hat."""
    eps = predict_eps(prediction_type, output, x, abar)
    z0 = predict_z0(prediction_type, output, x, abar)
    return abar_next.sqrt() * z0 + (1 - abar_next).sqrt() * eps


def ddim_inverse_step(prediction_type: str, output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor,
                      abar_next: torch.Tensor) -> torch.Tensor:
    """One DDIM inversion move of ``x`` from noise level ``abar`` up to ``abar_next``, given the model output for
    ``x`` queried at the destination timestep (as null-text inversion does): the output is read at ``abar_next``,
    where the model was told ``x`` lies, and the move is the DDIM step run backwards."""
    eps = predict_eps(prediction_type, output, x, abar_next)
    z0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    return abar_next.sqrt() * z0 + (1 - abar_next).sqrt() * eps


@torch.no_grad()
def sample(backend: Backend, prompt: str, negative_prompt: str = "", words: WordVectors | None = None,
           guidance: GammaSchedule | float | str = 7.0, steps: int = 20, width: int = 512, height: int = 512,
           seed: int = 0, batch: int = 1, on_step: Callable[[int, int], None] | None = None,
           patches: Mapping | None = None, labels: tuple = ("neg", "pos"),
           identities: Mapping[str, IdentityTokens] | None = None) -> list[Image.Image]:
    """Sample ``batch`` images for one prompt; the same seed gives the same images. ``patches`` are per-branch
    adapters (``Backend.patched``); the negative prompt's rows carry ``labels[0]``, the prompt's ``labels[1]``
    (by default the ids "neg" and "pos"). ``identities`` (name -> tokens) act wherever a prompt names them."""
    with backend.patched(patches or {}):
        return _sample(backend, prompt, negative_prompt, words, guidance, steps, width, height, seed, batch, on_step,
                       labels, identities)


def _sample(backend, prompt, negative_prompt, words, guidance, steps, width, height, seed, batch,
            on_step, labels, identities) -> list[Image.Image]:
    schedule = guidance if isinstance(guidance, GammaSchedule) else parse_gamma(guidance)
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, backend.latent_channels, height // backend.vae_scale, width // backend.vae_scale)
    noise = torch.randn(shape, generator=generator)
    pixels = sample_rows(backend, [prompt] * batch, [negative_prompt] * batch, words, [schedule] * batch, noise,
                         steps, (labels[0],) * batch + (labels[1],) * batch, on_step, identities)
    return to_images(pixels)


class StagedConditioning:
    """The conditioning of a batch of prompts at each timestep when identities are in use: every identity's K token
    of the timestep's stage in the context, its V token in the value contexts parked for the cross-attentions (rows
    that name no identity get their own context for both). Encoded once per combination of stages."""

    def __init__(self, backend: Backend, texts: list[str], words: WordVectors | None, labels: tuple,
                 identities: Mapping[str, IdentityTokens]):
        self.backend, self.texts, self.words, self.labels = backend, texts, dict(words or {}), labels
        self.identities = dict(identities)
        self._cache: dict[tuple[int, ...], tuple[Conditioning, torch.Tensor]] = {}

    def at(self, t: int) -> tuple[Conditioning, torch.Tensor]:
        stages = tuple(int(stage_of(t, tokens.stages, self.backend.alphas_cumprod.shape[0]))
                       for tokens in self.identities.values())
        if stages not in self._cache:
            def variant(which: int) -> Conditioning:
                chosen = {name: tokens.vectors(s, which) for (name, tokens), s in zip(self.identities.items(), stages)}
                return self.backend.encode(self.texts, self.words | chosen, self.labels)
            self._cache[stages] = (variant(K), variant(V).context)
        return self._cache[stages]


@torch.no_grad()
def sample_rows(backend: Backend, prompts: Sequence[str], negative_prompts: Sequence[str],
                words: WordVectors | None, guidance: Sequence[GammaSchedule], noise: torch.Tensor, steps: int = 20,
                labels: tuple = (), on_step: Callable[[int, int], None] | None = None,
                identities: Mapping[str, IdentityTokens] | None = None) -> torch.Tensor:
    """DDIM from ``noise`` (B,C,h,w) for B images, each with its own prompt, negative prompt and guidance, in one
    UNet call per step; ``labels`` are the 2B rows' adapter labels (negative prompts first). Returns the decoded
    pixels (B,3,H,W) in [-1,1]."""
    texts = list(negative_prompts) + list(prompts)
    if not identities:
        cond = backend.encode(texts, words, labels)
        return _denoise(backend, lambda t: (cond, contextlib.nullcontext()), guidance, noise, steps, on_step)
    staged, control = StagedConditioning(backend, texts, words, labels, identities), IdentityControl()
    with controlled(backend, control):
        def conditioning(t: int):
            cond, values = staged.at(t)
            return cond, control.call(values=values)
        return _denoise(backend, conditioning, guidance, noise, steps, on_step)


def _denoise(backend: Backend, conditioning: Callable, guidance: Sequence[GammaSchedule], noise: torch.Tensor,
             steps: int, on_step: Callable[[int, int], None] | None) -> torch.Tensor:
    """The DDIM loop; ``conditioning(t)`` gives the step's Conditioning and the context its UNet call runs in."""
    abar_all = backend.alphas_cumprod.to(torch.float32)
    T, batch = abar_all.shape[0], len(guidance)
    x = noise.to(backend.device)
    timesteps = ddim_timesteps(T, steps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        abar = abar_all[t].to(backend.device).view(1, 1, 1, 1)
        abar_prev = abar_all[t_prev].to(backend.device).view(1, 1, 1, 1)
        t_batch = torch.full((2 * batch,), t, dtype=torch.long, device=backend.device)
        cond, context = conditioning(t)
        with context:
            out_neg, out_pos = backend.unet(torch.cat([x, x]), t_batch, cond).chunk(2)
        at_t = torch.full((1,), t)
        gamma = torch.cat([schedule(at_t, T) for schedule in guidance]).to(backend.device)
        out = guide(out_neg, out_pos, gamma)
        x = ddim_step(backend.prediction_type, out, x, abar, abar_prev)
        if on_step:
            on_step(i + 1, len(timesteps))
    return backend.vae_decode(x)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels (B,3,H,W) in [-1,1] -> PIL images."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images in rows of ``columns`` (default: as square as possible)."""
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet
