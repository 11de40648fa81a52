"""BARET: editing a real image from the image and a target text alone (Balanced Attention based Real image Editing
driven by Target-text Inversion), over any Backend whose attention can be controlled.

1. DDIM inversion of the image latents z*_0 -> z*_T, conditioned on the target text (or the empty text), w = 1.
2. Target-text inversion schedule (TTIS): walking down from z*_T, at each step a copy of the target text's encoder
   output e, warm-started from the previous step's, takes at most ``ttis_iterations`` Adam steps on the MSE between
   the guided DDIM step and the inversion latent one level lower, stopping early below a threshold that grows
   with the step. The tuned e*_i of each step is kept.
3. Three DDIM processes from z*_T in one UNet call per step: reconstruction (cond e*_i), transition (cond
   alpha_i e*_i + (1 - alpha_i) e_tgt, alpha falling linearly) and editing (cond e_tgt), each guided against the
   negative prompt. Balanced attention: for the first tau_SA of the steps the editing rows attend with the
   reconstruction rows' self-attention K and V (cond and uncond rows); for the first tau_CA the editing cond row
   uses the transition cond row's cross-attention map, with its own values. With alpha 1 at every step (rigid
   edits) the transition is the reconstruction: its rows are left out and the map comes from the reconstruction.

Inversion and TTIS depend on the image, the texts, the model, the steps and the guidance only, so ``InversionCache``
keeps them for a re-edit with other alpha or tau values. The Conditioning is handled as rows: only its
cross-attention states are tuned or interpolated; its extras (SDXL's pooled text and size) follow their rows.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_control import CROSS, LAYER_SCOPES, SELF, Injection, RowInjection, controlled, step_window
from .backend import Backend, Conditioning
from .edit_config import EditConfig
from .errors import DreamArtistError
from .losses import guide
from .sampling import ddim_inverse_step, ddim_step, ddim_timesteps, to_images

RECONSTRUCTION, TRANSITION, EDITING = "reconstruction", "transition", "editing"
UNCOND, COND = "uncond", "cond"
NEGATIVE_ROW, TARGET_ROW, EMPTY_ROW = 0, 1, 2  # rows of Inversion.prompts


class EditStopped(DreamArtistError):
    """The edit was stopped on request before it finished."""


@dataclass(frozen=True)
class EditProgress:
    phase: str  # "inversion", "ttis" or "editing"
    step: int  # 1-based within the phase
    steps: int
    loss: float | None = None  # TTIS: the step's latent error after tuning


@dataclass(frozen=True)
class Inversion:
    """What inversion and TTIS leave for the edit; detached, on the backend's device."""

    timesteps: tuple[int, ...]  # sampling order, noisiest first
    trajectory: torch.Tensor  # (N+1, C, h, w): z*_0 (the image) ... z*_T, DDIM inversion
    tuned: torch.Tensor  # (N, tokens, dim): e*_i of sampling step i
    reconstruction: torch.Tensor  # (N+1, C, h, w): TTIS's own path from z*_T down, with e*_i
    prompts: Conditioning  # rows NEGATIVE_ROW, TARGET_ROW, EMPTY_ROW; context in float32
    losses: tuple[float, ...]  # per step: MSE between the reconstruction path and the trajectory
    iterations: tuple[int, ...]  # per step: Adam steps taken
    texts: tuple[str, str]  # (target, negative) it was made for
    cfg: float  # the guidance TTIS tuned under, which the edit must use too


@dataclass(frozen=True)
class EditResult:
    edited: torch.Tensor  # (1, C, h, w) latents
    reconstruction: torch.Tensor  # (1, C, h, w)
    transition: torch.Tensor  # (1, C, h, w); the reconstruction when the transition branch was left out
    inversion: Inversion
    reused: bool  # the inversion came from the cache


Report = Callable[[EditProgress], None]


def _stopper(should_stop: Callable[[], bool] | None) -> Callable[[], None]:
    def check() -> None:
        if should_stop is not None and should_stop():
            raise EditStopped("The edit was stopped before it finished.")
    return check


def _rows(prompts: Conditioning, picks: list[int], contexts: torch.Tensor | None = None) -> Conditioning:
    """Rows ``picks`` of ``prompts``, extras included, with their cross-attention states replaced by ``contexts``."""
    extras = {key: value[torch.tensor(picks, device=value.device)] for key, value in prompts.extras.items()}
    return Conditioning(context=prompts.context[picks] if contexts is None else contexts, extras=extras)


def _encode_prompts(backend: Backend, config: EditConfig) -> Conditioning:
    with torch.no_grad():
        cond = backend.encode([config.negative, config.target, ""])
    return Conditioning(context=cond.context.detach().float(),
                        extras={key: value.detach() for key, value in cond.extras.items()})


def alpha_schedule(config: EditConfig, steps: int) -> list[float]:
    """alpha_i of each sampling step: alpha_start at the noisiest, linear to alpha_end at the last; 1 when rigid."""
    if config.rigid:
        return [1.0] * steps
    if steps == 1:
        return [config.alpha_start]
    return [config.alpha_start + (config.alpha_end - config.alpha_start) * i / (steps - 1) for i in range(steps)]


def thresholds(config: EditConfig, steps: int) -> list[float]:
    """TTIS's early-stop threshold per sampling step: low while the noise is high, raised step by step."""
    return [config.threshold_start + i * config.threshold_step for i in range(steps)]


# -- 1 and 2: inversion and TTIS ------------------------------------------------------------------------------
def invert(backend: Backend, latents: torch.Tensor, config: EditConfig, on_progress: Report | None = None,
           should_stop: Callable[[], bool] | None = None) -> Inversion:
    """DDIM inversion of ``latents`` (1, C, h, w) and TTIS for ``config.target``."""
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"one image's latents (1, C, h, w) are edited at a time, not {tuple(latents.shape)}")
    report, stop = on_progress or (lambda progress: None), _stopper(should_stop)
    timesteps = tuple(ddim_timesteps(backend.alphas_cumprod.shape[0], config.steps))
    prompts = _encode_prompts(backend, config)
    z0 = latents.detach().to(backend.device, torch.float32)
    trajectory = _ddim_inversion(backend, z0, prompts, config, timesteps, report, stop)
    return _target_text_inversion(backend, trajectory, prompts, config, timesteps, report, stop)


@torch.no_grad()
def _ddim_inversion(backend, z0, prompts, config, timesteps, report, stop) -> torch.Tensor:
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    cond = _rows(prompts, [TARGET_ROW if config.inversion_prompt == "target" else EMPTY_ROW])
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


def _target_text_inversion(backend, trajectory, prompts, config, timesteps, report, stop) -> Inversion:
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    n, prediction = len(timesteps), backend.prediction_type
    gamma = torch.full((1,), config.cfg, device=backend.device)
    uncond = _rows(prompts, [NEGATIVE_ROW])
    e = prompts.context[TARGET_ROW:TARGET_ROW + 1]  # e*_{-1} = e_tgt
    x = trajectory[n:n + 1]
    tuned, path, losses, iterations = [], [x], [], []
    limits = thresholds(config, n)
    with backend.training(), torch.enable_grad():
        for i, t in enumerate(timesteps):
            stop()
            abar, abar_next = abar_all[t], abar_all[timesteps[i + 1] if i + 1 < n else 0]
            goal = trajectory[n - 1 - i:n - i]
            t_batch = torch.full((1,), t, device=backend.device)
            with torch.no_grad():
                out_uncond = backend.unet(x, t_batch, uncond)
            e = e.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([e], lr=config.ttis_lr)  # a fresh optimiser per step, as null-text inversion
            out_cond, taken = None, 0
            for _ in range(config.ttis_iterations):
                out_cond = backend.unet(x, t_batch, _rows(prompts, [TARGET_ROW], e))
                loss = F.mse_loss(ddim_step(prediction, guide(out_uncond, out_cond, gamma), x, abar, abar_next), goal)
                if loss.item() < limits[i]:
                    break  # this e is kept, and its UNet output advances the latent below
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                out_cond, taken = None, taken + 1
            e = e.detach()
            with torch.no_grad():
                if out_cond is None:
                    out_cond = backend.unet(x, t_batch, _rows(prompts, [TARGET_ROW], e))
                x = ddim_step(prediction, guide(out_uncond, out_cond.detach(), gamma), x, abar, abar_next)
            tuned.append(e[0])
            path.append(x)
            losses.append(F.mse_loss(x, goal).item())
            iterations.append(taken)
            report(EditProgress("ttis", i + 1, n, losses[-1]))
    return Inversion(timesteps=timesteps, trajectory=trajectory, tuned=torch.stack(tuned),
                     reconstruction=torch.cat(path), prompts=prompts, losses=tuple(losses),
                     iterations=tuple(iterations), texts=(config.target, config.negative), cfg=config.cfg)


# -- 3: the three coupled processes -------------------------------------------------------------------------
def balanced_attention(config: EditConfig, steps: int, with_transition: bool = True) -> RowInjection:
    """BAM: the editing rows take the reconstruction rows' self-attention K/V (cond and uncond) in the tau_SA window,
    and the editing cond row the transition cond row's cross-attention map (the reconstruction's when the transition
    is left out) in the tau_CA window."""
    source = TRANSITION if with_transition else RECONSTRUCTION
    return RowInjection([
        Injection(SELF, (((EDITING, UNCOND), (RECONSTRUCTION, UNCOND)), ((EDITING, COND), (RECONSTRUCTION, COND))),
                  step_window(config.sa_start, config.tau_sa, steps), LAYER_SCOPES[config.sa_layers]),
        Injection(CROSS, (((EDITING, COND), (source, COND)),),
                  step_window(config.ca_start, config.tau_ca, steps), LAYER_SCOPES[config.ca_layers]),
    ])


def edit_latents(backend: Backend, inversion: Inversion, config: EditConfig, *, transition: bool | None = None,
                 on_progress: Report | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(edited, reconstruction, transition) latents. ``transition`` None runs the transition branch unless alpha is 1
    at every step (then the reconstruction stands for it); True or False forces it in or out."""
    report, stop = on_progress or (lambda progress: None), _stopper(should_stop)
    timesteps, n = inversion.timesteps, len(inversion.timesteps)
    asked = (config.steps, (config.target, config.negative), config.cfg)
    if asked != (n, inversion.texts, inversion.cfg):
        raise ValueError(f"the inversion was made for (steps, texts, cfg) {(n, inversion.texts, inversion.cfg)}, "
                         f"the edit asks for {asked}")
    alphas = alpha_schedule(config, n)
    if transition is None:
        transition = any(alpha != 1 for alpha in alphas)
    branches = (RECONSTRUCTION, TRANSITION, EDITING) if transition else (RECONSTRUCTION, EDITING)
    rows = tuple((branch, UNCOND) for branch in branches) + tuple((branch, COND) for branch in branches)
    count, prompts = len(branches), inversion.prompts
    target = prompts.context[TARGET_ROW:TARGET_ROW + 1]
    negative = prompts.context[NEGATIVE_ROW:NEGATIVE_ROW + 1].expand(count, -1, -1)
    picks = [NEGATIVE_ROW] * count + [TARGET_ROW] * count
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    gamma = torch.full((count,), config.cfg, device=backend.device)
    x = inversion.trajectory[n:n + 1].expand(count, -1, -1, -1).clone()
    with controlled(backend, balanced_attention(config, n, transition)) as calls, torch.no_grad():
        for i, t in enumerate(timesteps):
            stop()
            tuned = inversion.tuned[i:i + 1]
            conds = {RECONSTRUCTION: tuned, TRANSITION: alphas[i] * tuned + (1 - alphas[i]) * target, EDITING: target}
            contexts = torch.cat([negative, *(conds[branch] for branch in branches)])
            with calls.at(i, rows):
                out = backend.unet(torch.cat([x, x]), torch.full((2 * count,), t, device=backend.device),
                                   _rows(prompts, picks, contexts))
            out_uncond, out_cond = out.chunk(2)
            abar, abar_next = abar_all[t], abar_all[timesteps[i + 1] if i + 1 < n else 0]
            x = ddim_step(backend.prediction_type, guide(out_uncond, out_cond, gamma), x, abar, abar_next)
            report(EditProgress("editing", i + 1, n))
    final = dict(zip(branches, x.split(1)))
    return final[EDITING], final[RECONSTRUCTION], final.get(TRANSITION, final[RECONSTRUCTION])


# -- the whole edit, with the cache -------------------------------------------------------------------------
class InversionCache:
    """The last ``capacity`` inversions (with their TTIS), keyed by what they depend on."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Inversion] = OrderedDict()

    @staticmethod
    def key(backend: Backend, latents: torch.Tensor, config: EditConfig) -> tuple:
        """(image latents hash, target text, model, steps, cfg) and the other options inversion and TTIS read."""
        digest = hashlib.sha256(latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
        model = (backend.model_name, backend.model_hash or f"instance {id(backend)}")  # no hash: this object only
        return (digest, config.target, model, config.steps, config.cfg, config.negative, config.inversion_prompt,
                config.ttis_iterations, config.ttis_lr, config.threshold_start, config.threshold_step)

    def get(self, key: tuple) -> Inversion | None:
        if key in self._entries:
            self._entries.move_to_end(key)
        return self._entries.get(key)

    def put(self, key: tuple, inversion: Inversion) -> None:
        self._entries[key] = inversion
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def edit(backend: Backend, latents: torch.Tensor, config: EditConfig, *, cache: InversionCache | None = None,
         on_progress: Report | None = None, should_stop: Callable[[], bool] | None = None) -> EditResult:
    """Edit one image's latents (1, C, h, w) toward ``config.target``; with ``cache``, an image already inverted
    under the same texts, model, steps and guidance skips inversion and TTIS."""
    key = InversionCache.key(backend, latents, config) if cache is not None else None
    inversion = cache.get(key) if cache is not None else None
    reused = inversion is not None
    if inversion is None:
        inversion = invert(backend, latents, config, on_progress, should_stop)
        if cache is not None:
            cache.put(key, inversion)
    edited, reconstruction, transition = edit_latents(backend, inversion, config, on_progress=on_progress,
                                                      should_stop=should_stop)
    return EditResult(edited, reconstruction, transition, inversion, reused)


def decode(backend: Backend, result: EditResult, branches: bool = False) -> dict:
    """The edited image as a PIL image under "edited", with ``branches`` also "reconstruction" and "transition"."""
    names = ("edited", RECONSTRUCTION, TRANSITION) if branches else ("edited",)
    latents = torch.cat([result.edited, result.reconstruction, result.transition][:len(names)])
    with torch.no_grad():
        return dict(zip(names, to_images(backend.vae_decode(latents))))
