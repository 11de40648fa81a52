"""Inverting a real image for editing, over any Backend: what BARET (dreamartist.baret) and null-text inversion
(dreamartist.null_text) share.

- The prompts as rows: NEGATIVE_ROW, TARGET_ROW (the target text, or the caption) and EMPTY_ROW; only a row's
  cross-attention states are ever tuned or replaced, its extras (SDXL's pooled text and size) follow it.
- DDIM inversion z*_0 -> z*_T at w = 1 (``ddim_inversion``).
- ``invert_image``: both, into an ``Inversion``.
- ``tune_along``: walking down from z*_T, at each step one text row (BARET's target text, null-text inversion's null
  text), warm-started from the previous step's, takes at most ``iterations`` Adam steps on the MSE between the
  guided DDIM step and the inversion latent one level lower, under a fresh optimiser; the other row's prediction
  is made once per step without gradient. The loop ends early once the loss is below the step's limit: BARET
  checks before each Adam step (a good enough row is kept as it is), null-text inversion after it (as its
  reference code does). The tuned row advances the latent with a full guided step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import Backend, Conditioning
from .errors import DreamArtistError
from .losses import guide
from .sampling import ddim_inverse_step, ddim_step, ddim_timesteps

NEGATIVE_ROW, TARGET_ROW, EMPTY_ROW = 0, 1, 2  # rows of encode_prompts


class EditStopped(DreamArtistError):
    """The edit was stopped on request before it finished."""


@dataclass(frozen=True)
class EditProgress:
    phase: str  # "inversion", then "ttis" or "null-text", then "editing"
    step: int  # 1-based within the phase
    steps: int
    loss: float | None = None  # tuning: the step's latent error after tuning


Report = Callable[[EditProgress], None]


def stopper(should_stop: Callable[[], bool] | None) -> Callable[[], None]:
    def check() -> None:
        if should_stop is not None and should_stop():
            raise EditStopped("The edit was stopped before it finished.")
    return check


def rows(prompts: Conditioning, picks: list[int], contexts: torch.Tensor | None = None) -> Conditioning:
    """Rows ``picks`` of ``prompts``, extras included, with their cross-attention states replaced by ``contexts``."""
    extras = {key: value[torch.tensor(picks, device=value.device)] for key, value in prompts.extras.items()}
    return Conditioning(context=prompts.context[picks] if contexts is None else contexts, extras=extras)


def encode_prompts(backend: Backend, negative: str, target: str) -> Conditioning:
    """Rows NEGATIVE_ROW, TARGET_ROW and EMPTY_ROW, detached; the context in float32."""
    with torch.no_grad():
        cond = backend.encode([negative, target, ""])
    return Conditioning(context=cond.context.detach().float(),
                        extras={key: value.detach() for key, value in cond.extras.items()})


@torch.no_grad()
def ddim_inversion(backend: Backend, z0: torch.Tensor, cond: Conditioning, timesteps: Sequence[int], report: Report,
                   stop: Callable[[], None]) -> torch.Tensor:
    """(N+1, C, h, w): z*_0 (the image's latents) ... z*_T, each step conditioned on ``cond`` at w = 1."""
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    # The sampler ends at alphas_cumprod[0] (sampling.sample_rows), so the image's latents stand at that level.
    path, x, level = [z0], z0, 0
    for k, t in enumerate(reversed(timesteps)):
        stop()
        out = backend.unet(x, torch.full((1,), t, device=backend.device), cond)
        x = ddim_inverse_step(backend.prediction_type, out, x, abar_all[level], abar_all[t])
        path.append(x)
        level = t
        report(EditProgress("inversion", k + 1, len(timesteps)))
    return torch.cat(path)


def limits(start: float, step: float, steps: int) -> list[float]:
    """The early-stop limit per sampling step: low while the noise is high, raised step by step."""
    return [start + i * step for i in range(steps)]


@dataclass(frozen=True)
class Inversion:
    """An image's DDIM inversion and the text row tuned along it; detached, on the backend's device."""

    timesteps: tuple[int, ...]  # sampling order, noisiest first
    trajectory: torch.Tensor  # (N+1, C, h, w): z*_0 (the image) ... z*_T, DDIM inversion
    tuned: torch.Tensor  # (N, tokens, dim): the tuned row of sampling step i
    reconstruction: torch.Tensor  # (N+1, C, h, w): the tuned path from z*_T down
    prompts: Conditioning  # rows NEGATIVE_ROW, TARGET_ROW, EMPTY_ROW; context in float32
    losses: tuple[float, ...]  # per step: MSE between the tuned path and the trajectory
    iterations: tuple[int, ...]  # per step: Adam steps taken
    texts: tuple[str, str]  # (target or caption, negative) it was made for
    cfg: float  # the guidance it was tuned under, which the edit must use too


@dataclass(frozen=True)
class StepTuning:
    """Which row ``tune_along`` tunes and how."""

    phase: str  # the progress phase
    row: int  # TARGET_ROW (the cond; NEGATIVE_ROW is the fixed uncond) or NEGATIVE_ROW (the uncond; TARGET_ROW fixed)
    iterations: int  # at most, per sampling step
    lr: Callable[[int, int], float]  # (step, steps) -> the step's learning rate
    limit: tuple[float, float]  # the early-stop limit at the first step and its rise per step (``limits``)
    check_first: bool  # the limit is checked before each Adam step (True) or after it (False)


def invert_image(backend: Backend, latents: torch.Tensor, texts: tuple[str, str], inversion_row: int, steps: int,
                 cfg: float, tuning: StepTuning, report: Report, stop: Callable[[], None]) -> Inversion:
    """DDIM inversion of ``latents`` (1, C, h, w) conditioned on row ``inversion_row`` of ``texts`` (text, negative),
    then the tuning of one row along it under guidance ``cfg``."""
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"one image's latents (1, C, h, w) are inverted at a time, not {tuple(latents.shape)}")
    timesteps = tuple(ddim_timesteps(backend.alphas_cumprod.shape[0], steps))
    prompts = encode_prompts(backend, texts[1], texts[0])
    z0 = latents.detach().to(backend.device, torch.float32)
    trajectory = ddim_inversion(backend, z0, rows(prompts, [inversion_row]), timesteps, report, stop)
    tuned, path, losses, taken = tune_along(backend, trajectory, prompts, timesteps, cfg, tuning, report, stop)
    return Inversion(timesteps=timesteps, trajectory=trajectory, tuned=tuned, reconstruction=path, prompts=prompts,
                     losses=losses, iterations=taken, texts=texts, cfg=cfg)


def tune_along(backend: Backend, trajectory: torch.Tensor, prompts: Conditioning, timesteps: Sequence[int],
               cfg: float, tuning: StepTuning, report: Report, stop: Callable[[], None]):
    """(tuned rows, tuned path, losses, Adam steps taken), as ``Inversion`` holds them."""
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    n, prediction = len(timesteps), backend.prediction_type
    gamma = torch.full((1,), cfg, device=backend.device)
    tunes_cond = tuning.row == TARGET_ROW
    limit = limits(*tuning.limit, n)
    fixed = rows(prompts, [NEGATIVE_ROW if tunes_cond else TARGET_ROW])
    e = prompts.context[tuning.row:tuning.row + 1]
    x = trajectory[n:n + 1]
    tuned, path, losses, taken_per_step = [], [x], [], []

    def guided(out, out_fixed, x, abar, abar_next) -> torch.Tensor:
        uncond, cond = (out_fixed, out) if tunes_cond else (out, out_fixed)
        return ddim_step(prediction, guide(uncond, cond, gamma), x, abar, abar_next)

    with backend.training(), torch.enable_grad():
        for i, t in enumerate(timesteps):
            stop()
            abar, abar_next = abar_all[t], abar_all[timesteps[i + 1] if i + 1 < n else 0]
            goal = trajectory[n - 1 - i:n - i]
            t_batch = torch.full((1,), t, device=backend.device)
            with torch.no_grad():
                state = (backend.unet(x, t_batch, fixed), x, abar, abar_next)
            e = e.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([e], lr=tuning.lr(i, n))
            out, taken = None, 0
            for _ in range(tuning.iterations):
                out = backend.unet(x, t_batch, rows(prompts, [tuning.row], e))
                loss = F.mse_loss(guided(out, *state), goal)
                good_enough = loss.item() < limit[i]
                if tuning.check_first and good_enough:
                    break  # this row is kept, and its UNet output advances the latent below
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                out, taken = None, taken + 1
                if good_enough:
                    break
            e = e.detach()
            with torch.no_grad():
                if out is None:
                    out = backend.unet(x, t_batch, rows(prompts, [tuning.row], e))
                x = guided(out.detach(), *state)
            tuned.append(e[0])
            path.append(x)
            losses.append(F.mse_loss(x, goal).item())
            taken_per_step.append(taken)
            report(EditProgress(tuning.phase, i + 1, n, losses[-1]))
    return torch.stack(tuned), torch.cat(path), tuple(losses), tuple(taken_per_step)
