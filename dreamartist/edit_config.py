"""Every option of a BARET edit (dreamartist.baret), defined and validated once for the CLI and any front end.

Defaults are the paper's: SD's DDIM with 50 steps and guidance 7.5, target-text inversion with at most 5 Adam steps
at lr 1e-3 per step, the transition weight alpha falling from 0.8 to 0.1, self-attention K/V injected for the first
30% of the steps and the cross-attention map for the first 60%. The early-stop threshold of step i (0 the noisiest)
is threshold_start + i * threshold_step; the paper lost its equation and describes this shape, so null-text
inversion's constants (1e-5, 2e-5) are the defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .attention_control import LAYER_SCOPES
from .config import _checked, option
from .errors import InputError

INVERSION_PROMPTS = ("target", "empty")
LAYER_CHOICES = tuple(LAYER_SCOPES)


@dataclass(frozen=True)
class EditConfig:
    target: str = option("", "Target text", "What the edited image should show, e.g. 'a dog lying down'.")
    negative: str = option("", "Negative prompt", "The unconditional text of every branch; the paper uses the "
                                                  "empty text.")
    steps: int = option(50, "Steps", "DDIM steps of the inversion and of the edit.", minimum=1, maximum=1000, step=1)
    cfg: float = option(7.5, "CFG scale", "Guidance scale of the reconstruction, transition and editing branches.",
                        minimum=1.0, maximum=30.0)
    alpha_start: float = option(0.8, "Alpha at the first step",
                                "Transition weight of the tuned text at the noisiest step; higher keeps more of the "
                                "image. The paper recommends 0.8 to 0.6.", minimum=0.0, maximum=1.0)
    alpha_end: float = option(0.1, "Alpha at the last step", "Transition weight at the last step (linear in "
                                                             "between).", minimum=0.0, maximum=1.0)
    rigid: bool = option(False, "Rigid edit", "Alpha 1 at every step (style, background, object swap): the "
                                              "transition branch is the reconstruction and is left out.")
    tau_sa: float = option(0.3, "Self-attention injection (tau_SA)",
                           "Share of the steps, from the first, in which the edit takes the reconstruction's "
                           "self-attention K and V (paper: 0.2 to 0.4).", minimum=0.0, maximum=1.0)
    sa_start: float = option(0.0, "Self-attention injection start",
                             "Share of the steps before the injection starts; it ends at tau_SA.", minimum=0.0,
                             maximum=1.0)
    tau_ca: float = option(0.6, "Cross-attention injection (tau_CA)",
                           "Share of the steps, from the first, in which the edit takes the transition's "
                           "cross-attention map (paper: 0.4 to 0.8).", minimum=0.0, maximum=1.0)
    ca_start: float = option(0.0, "Cross-attention injection start",
                             "Share of the steps before the injection starts; it ends at tau_CA.", minimum=0.0,
                             maximum=1.0)
    sa_layers: str = option("all", "Self-attention layers", "Where K/V are injected: all, decoder (the decoder's two "
                                                            "finest resolutions) or coarse (half the latent "
                                                            "resolution and below).", choices=LAYER_CHOICES)
    ca_layers: str = option("all", "Cross-attention layers", "Where the map is injected (as for self-attention).",
                            choices=LAYER_CHOICES)
    inversion_prompt: str = option("empty", "Inversion prompt", "The text the DDIM inversion is conditioned on: "
                                                                "the empty text or the target text.",
                                   choices=INVERSION_PROMPTS)
    ttis_iterations: int = option(5, "Inversion iterations per step", "Adam steps on the tuned text per DDIM step; "
                                                                      "0 is plain DDIM inversion.",
                                  minimum=0, maximum=100, step=1)
    ttis_lr: float = option(1e-3, "Inversion learning rate", minimum=1e-7, maximum=1.0)
    threshold_start: float = option(1e-5, "Early-stop threshold at the first step",
                                    "An inversion step stops once its latent error is below this.", minimum=0.0,
                                    maximum=1.0)
    threshold_step: float = option(2e-5, "Early-stop threshold increase per step", minimum=0.0, maximum=1.0)

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise InputError(" ".join(problems))

    def replace(self, **changes: Any) -> EditConfig:
        return dataclasses.replace(self, **changes)


def validate(config: EditConfig) -> list[str]:
    """One sentence per bad value. Values of a valid type are normalised in place (text stripped, whole floats made
    int), so that the config holds exactly what was checked."""
    problems = []
    for f in dataclasses.fields(config):
        try:
            object.__setattr__(config, f.name, _checked(f, getattr(config, f.name)))
        except InputError as e:
            problems.append(str(e))
    if problems:
        return problems
    if not config.target:
        problems.append("The target text is empty; describe what the edited image should show.")
    for name, start, end in (("self", config.sa_start, config.tau_sa), ("cross", config.ca_start, config.tau_ca)):
        if start > end:
            problems.append(f"The {name}-attention injection starts at {start} of the steps, after it ends at {end}; "
                            "give a start no later than the end.")
    return problems


def fields() -> tuple[dataclasses.Field, ...]:
    """The options in display order, for front ends that build one control per field."""
    return dataclasses.fields(EditConfig)
