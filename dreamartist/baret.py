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
   A branch's rows run only in the steps that read them: the reconstruction walks TTIS's path (the same e*_i from
   the same z*_T), so it is taken from there and run only inside its injection windows; the transition runs until
   its map window ends, or to the last step when its image is wanted.

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

from .attention_control import CROSS, LAYER_SCOPES, SELF, Injection, RowInjection, controlled, step_window
from .backend import Backend
from .edit_config import EditConfig
from .inversion import (
    EMPTY_ROW,
    NEGATIVE_ROW,
    TARGET_ROW,
    EditProgress,
    Inversion,
    Report,
    StepTuning,
    invert_image,
    rows,
    stopper,
)
from .losses import guide
from .sampling import ddim_step, to_images

RECONSTRUCTION, TRANSITION, EDITING = "reconstruction", "transition", "editing"
Latents = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # edited, reconstruction, transition
UNCOND, COND = "uncond", "cond"


@dataclass(frozen=True)
class EditResult:
    edited: torch.Tensor  # (1, C, h, w) latents
    reconstruction: torch.Tensor  # (1, C, h, w)
    transition: torch.Tensor | None  # (1, C, h, w); the reconstruction when the transition branch was left out;
    # None when it stopped after its map window (no branch images asked)
    inversion: Inversion
    reused: bool  # the inversion came from the cache


def alpha_schedule(config: EditConfig, steps: int) -> list[float]:
    """alpha_i of each sampling step: alpha_start at the noisiest, linear to alpha_end at the last; 1 when rigid."""
    if config.rigid:
        return [1.0] * steps
    if steps == 1:
        return [config.alpha_start]
    return [config.alpha_start + (config.alpha_end - config.alpha_start) * i / (steps - 1) for i in range(steps)]


# -- 1 and 2: inversion and TTIS ------------------------------------------------------------------------------
def invert(backend: Backend, latents: torch.Tensor, config: EditConfig, on_progress: Report | None = None,
           should_stop: Callable[[], bool] | None = None) -> Inversion:
    """DDIM inversion of ``latents`` (1, C, h, w) and TTIS for ``config.target``."""
    report, stop = on_progress or (lambda progress: None), stopper(should_stop)
    ttis = StepTuning("ttis", TARGET_ROW, config.ttis_iterations, lambda step, steps: config.ttis_lr,
                      (config.threshold_start, config.threshold_step), check_first=True)
    return invert_image(backend, latents, (config.target, config.negative),
                        TARGET_ROW if config.inversion_prompt == "target" else EMPTY_ROW, config.steps, config.cfg,
                        ttis, report, stop)


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
                 branch_images: bool = False, on_progress: Report | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Latents:
    """(edited, reconstruction, transition) latents. ``transition`` None runs the transition branch unless alpha is 1
    at every step (then the reconstruction stands for it); True or False forces it in or out.

    A branch's rows join a step's UNet call only where something reads them. The reconstruction's DDIM process is
    TTIS's own path (its e*_i from z*_T, eq. 2), so its rows run at that path's latents, only in the steps whose
    injections read them, and its result is the path's end. The transition's rows run from the start to the end of
    its map window, or to the last step with ``branch_images``; without, its result is None (unless the
    reconstruction stands for it)."""
    report, stop = on_progress or (lambda progress: None), stopper(should_stop)
    timesteps, n = inversion.timesteps, len(inversion.timesteps)
    asked = (config.steps, (config.target, config.negative), config.cfg)
    if asked != (n, inversion.texts, inversion.cfg):
        raise ValueError(f"the inversion was made for (steps, texts, cfg) {(n, inversion.texts, inversion.cfg)}, "
                         f"the edit asks for {asked}")
    alphas = alpha_schedule(config, n)
    if transition is None:
        transition = any(alpha != 1 for alpha in alphas)
    injection = balanced_attention(config, n, transition)
    self_window, map_window = (part.steps for part in injection.injections)
    path = inversion.reconstruction  # (N+1, C, h, w): the reconstruction's latent before each step, then its end

    def runs(branch: str, i: int) -> bool:
        if branch == RECONSTRUCTION:
            return i in self_window or (not transition and i in map_window)
        if branch == TRANSITION:
            return transition and (branch_images or i < map_window.stop)
        return True

    prompts = inversion.prompts
    target = prompts.context[TARGET_ROW:TARGET_ROW + 1]
    negative = prompts.context[NEGATIVE_ROW:NEGATIVE_ROW + 1]
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    carried = {TRANSITION: path[0:1], EDITING: path[0:1]}  # both start from z*_T
    with controlled(backend, injection) as calls, torch.no_grad():
        for i, t in enumerate(timesteps):
            stop()
            branches = [branch for branch in (RECONSTRUCTION, TRANSITION, EDITING) if runs(branch, i)]
            count = len(branches)
            tuned = inversion.tuned[i:i + 1]
            conds = {RECONSTRUCTION: tuned, TRANSITION: alphas[i] * tuned + (1 - alphas[i]) * target, EDITING: target}
            x = torch.cat([path[i:i + 1] if branch == RECONSTRUCTION else carried[branch] for branch in branches])
            contexts = torch.cat([negative.expand(count, -1, -1), *(conds[branch] for branch in branches)])
            labels = tuple((branch, UNCOND) for branch in branches) + tuple((branch, COND) for branch in branches)
            with calls.at(i, labels):
                out = backend.unet(torch.cat([x, x]), torch.full((2 * count,), t, device=backend.device),
                                   rows(prompts, [NEGATIVE_ROW] * count + [TARGET_ROW] * count, contexts))
            out_uncond, out_cond = out.chunk(2)
            abar, abar_next = abar_all[t], abar_all[timesteps[i + 1] if i + 1 < n else 0]
            gamma = torch.full((count,), config.cfg, device=backend.device)
            x = ddim_step(backend.prediction_type, guide(out_uncond, out_cond, gamma), x, abar, abar_next)
            carried.update((branch, latent) for branch, latent in zip(branches, x.split(1)) if branch in carried)
            report(EditProgress("editing", i + 1, n))
    if not transition:
        return carried[EDITING], path[n:n + 1], path[n:n + 1]
    return carried[EDITING], path[n:n + 1], carried[TRANSITION] if runs(TRANSITION, n - 1) else None


# -- the whole edit, with the cache -------------------------------------------------------------------------
def inversion_options(config: EditConfig) -> tuple:
    """What the inversion and TTIS read of ``config``: two configs that agree on it share one inversion of an image."""
    return (config.target, config.steps, config.cfg, config.negative, config.inversion_prompt, config.ttis_iterations,
            config.ttis_lr, config.threshold_start, config.threshold_step)


class InversionCache:
    """The last ``capacity`` inversions (with their TTIS), keyed by what they depend on."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Inversion] = OrderedDict()

    @staticmethod
    def key(backend: Backend, latents: torch.Tensor, config: EditConfig) -> tuple:
        """(image latents hash, model) and the options the inversion and TTIS read (``inversion_options``)."""
        digest = hashlib.sha256(latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
        model = (backend.model_name, backend.model_hash or f"instance {id(backend)}")  # no hash: this object only
        return (digest, model, *inversion_options(config))

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
         branch_images: bool = False, on_progress: Report | None = None,
         should_stop: Callable[[], bool] | None = None) -> EditResult:
    """Edit one image's latents (1, C, h, w) toward ``config.target``; with ``cache``, an image already inverted
    under the same texts, model, steps and guidance skips inversion and TTIS; ``branch_images`` carries the transition
    to the end for ``decode(..., branches=True)``."""
    key = InversionCache.key(backend, latents, config) if cache is not None else None
    inversion = cache.get(key) if cache is not None else None
    reused = inversion is not None
    if inversion is None:
        inversion = invert(backend, latents, config, on_progress, should_stop)
        if cache is not None:
            cache.put(key, inversion)
    edited, reconstruction, transition = edit_latents(backend, inversion, config, branch_images=branch_images,
                                                      on_progress=on_progress, should_stop=should_stop)
    return EditResult(edited, reconstruction, transition, inversion, reused)


def decode(backend: Backend, result: EditResult, branches: bool = False) -> dict:
    """The edited image as a PIL image under "edited", with ``branches`` also "reconstruction" and "transition"."""
    if branches and result.transition is None:
        raise ValueError("the transition was not carried to the end: edit with branch_images=True")
    names = ("edited", RECONSTRUCTION, TRANSITION) if branches else ("edited",)
    latents = torch.cat([result.edited, result.reconstruction, result.transition][:len(names)])
    with torch.no_grad():
        return dict(zip(names, to_images(backend.vae_decode(latents))))
