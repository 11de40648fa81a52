"""Null-text inversion (Mokady et al., 2023) over any Backend: the comparison BARET is measured against.

1. DDIM inversion of the image latents, conditioned on a caption of the image at w = 1.
2. Walking down from z*_T, at each step i a copy of the unconditional (null) text's encoder output, warm-started from
   the previous step's, takes at most ``iterations`` Adam steps (a fresh optimiser, lr ``lr * (1 - i / (2 N))``:
   1e-2 falling to half over the steps as in the prompt-to-prompt notebook) on the MSE between the guided DDIM step
   and the inversion latent one level lower. The caption's prediction is made once per step without gradient; the
   loop stops after the step whose loss was below ``threshold_start + i * threshold_step``. The tuned embedding is
   kept and advances the latent with a full guided step. Both are dreamartist.inversion's, as BARET's TTIS is.
3. An edit then samples from z*_T with the target text as the cond and the tuned null embedding of each step as
   the uncond (``sample``); with the caption as the text it reconstructs the image.

Unlike BARET it needs a caption of the image. The conditioning is handled as rows, as in BARET: only the
cross-attention states are tuned; extras (SDXL's pooled text and size) follow their rows.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .backend import Backend, Conditioning
from .inversion import NEGATIVE_ROW, TARGET_ROW, Inversion, Report, StepTuning, invert_image, rows, stopper
from .losses import guide
from .sampling import ddim_step

ITERATIONS = 10  # inner Adam steps per DDIM step (the notebook's num_inner_steps)
LR = 1e-2


def invert(backend: Backend, latents: torch.Tensor, caption: str, *, steps: int = 50, cfg: float = 7.5,
           iterations: int = ITERATIONS, lr: float = LR, threshold_start: float = 1e-5, threshold_step: float = 2e-5,
           on_progress: Report | None = None, should_stop: Callable[[], bool] | None = None) -> Inversion:
    """DDIM inversion of ``latents`` (1, C, h, w) with ``caption``, then the per-step tuning of the null text (the
    Inversion's ``tuned`` rows); its texts are (caption, the null text)."""
    report, stop = on_progress or (lambda progress: None), stopper(should_stop)
    tuning = StepTuning("null-text", NEGATIVE_ROW, iterations, lambda step, steps: lr * (1 - step / (2 * steps)),
                        (threshold_start, threshold_step), check_first=False)
    return invert_image(backend, latents, (caption, ""), TARGET_ROW, steps, cfg, tuning, report, stop)


@torch.no_grad()
def sample(backend: Backend, inversion: Inversion, text: str) -> torch.Tensor:
    """The latents (1, C, h, w) sampled from z*_T with ``text`` as the cond and each step's tuned null text as the
    uncond, at the guidance the inversion was tuned under."""
    encoded = backend.encode([text])
    cond = Conditioning(context=encoded.context.float(), extras=dict(encoded.extras))
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    timesteps, n = inversion.timesteps, len(inversion.timesteps)
    gamma = torch.full((1,), inversion.cfg, device=backend.device)
    x = inversion.trajectory[n:n + 1]
    for i, t in enumerate(timesteps):
        t_batch = torch.full((2,), t, device=backend.device)
        uncond = rows(inversion.prompts, [NEGATIVE_ROW], inversion.tuned[i:i + 1])
        both = Conditioning(context=torch.cat([uncond.context, cond.context]),
                            extras={key: torch.cat([value, cond.extras[key]]) for key, value in uncond.extras.items()})
        out_uncond, out_cond = backend.unet(torch.cat([x, x]), t_batch, both).chunk(2)
        abar, abar_next = abar_all[t], abar_all[timesteps[i + 1] if i + 1 < n else 0]
        x = ddim_step(backend.prediction_type, guide(out_uncond, out_cond, gamma), x, abar, abar_next)
    return x
