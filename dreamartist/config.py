"""Every training option, defined and validated once: the tab, the API, the CLI and the trainer all read this class.

Defaults follow the DreamArtist paper (sec. 4, 5): S^p and S^n of 3 vectors, gamma 3, lr 0.0025, batch 1,
reconstruction loss on. Each field's metadata says how a front end shows it (label, help, range, choices,
whether it is folded away under "advanced"). Validation runs in ``__post_init__`` and nowhere else; it also
parses the text options once (``gamma_schedule``, ``template_lines``) so that nothing downstream parses again.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .gamma import GammaSchedule, parse_gamma
from .names import validate_name
from .templates import template_lines

FILE_FORMATS = ("pt", "safetensors")
MAX_STEPS = 100_000


def option(default: Any, label: str, help: str = "", *, minimum: float | None = None,
           maximum: float | None = None, step: float | None = None, choices: tuple = (),
           advanced: bool = False, group: str = "") -> Any:
    """A dataclass field with the metadata a front end needs to show and check it; ``group`` names the row of
    options that belong together in the tab."""
    meta = dict(label=label, help=help, minimum=minimum, maximum=maximum, step=step, choices=choices,
                advanced=advanced, group=group)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    name: str = option("", "Name", "The word you will type in prompts; the pair is NAME and NAME-neg.",
                       group="concept")
    init_words: str = option("*", "Initialization words",
                             "Words close to the concept (e.g. 'robot'); S^p starts from their embeddings.",
                             group="concept")
    pos_len: int = option(3, "Vectors in S^p", "Length of the positive pseudo-word.", minimum=1, maximum=75, step=1,
                          group="lengths")
    neg_len: int = option(3, "Vectors in S^n", "Length of the negative pseudo-word.", minimum=1, maximum=75, step=1,
                          group="lengths")
    gamma: str = option("3", "Gamma (training CFG)",
                        "Guidance scale of the training loss: 3 for objects, 5 for styles; "
                        "or a schedule over t such as 1.5-3.0, 1.5-3.0:cos, 1.5-3.0:cos2.", group="guidance")
    lr: float = option(0.0025, "Learning rate", minimum=1e-6, maximum=1.0, group="guidance")
    steps: int = option(1500, "Steps", "Optimiser steps.", minimum=1, maximum=MAX_STEPS, step=1, group="run")
    seed: int = option(0, "Seed", "-1 for a random seed.", minimum=-1, maximum=2**32 - 1, step=1, group="run")
    width: int = option(0, "Width", "0: the model's own size (512 for SD1/SD2, 1024 for SDXL).", minimum=0,
                        maximum=2048, step=8, group="size")
    height: int = option(0, "Height", "0: the model's own size (512 for SD1/SD2, 1024 for SDXL).", minimum=0,
                         maximum=2048, step=8, group="size")
    reconstruction: bool = option(True, "Reconstruction loss",
                                  "Decode the predicted z0 and compare it with the reference (eq. 6). "
                                  "Better fidelity, more memory.", group="reconstruction")
    rec_weight: float = option(1.0, "Reconstruction weight", minimum=0.0, maximum=100.0, group="reconstruction")
    template: str = option("object", "Prompt template",
                           "'object', 'style', or your own lines, one per line, each with [name] "
                           "(and [filewords] for a caption).", group="template")
    preview_every: int = option(0, "Preview every N steps", "0 for none.", minimum=0, maximum=MAX_STEPS, step=1,
                                group="outputs")
    save_every: int = option(0, "Save every N steps", "0 saves only at the end.", minimum=0, maximum=MAX_STEPS,
                             step=1, group="outputs")
    adapters: bool = option(False, "PN adapters (DreamArtist++)",
                            "Also train a LoRA for each CFG branch: phi^p on the S^p rows, phi^n on the S^n rows. "
                            "Stronger likeness, larger files.", group="adapters")
    # Advanced
    neg_lr_mult: float = option(1.0, "S^n lr multiplier", minimum=0.0, maximum=100.0, advanced=True,
                                group="optimiser")
    weight_decay: float = option(0.0, "Weight decay", minimum=0.0, maximum=1.0, advanced=True, group="optimiser")
    beta1: float = option(0.9, "Adam beta1", minimum=0.0, maximum=0.9999, advanced=True, group="betas")
    beta2: float = option(0.999, "Adam beta2", minimum=0.0, maximum=0.99999, advanced=True, group="betas")
    batch_size: int = option(1, "Batch size", minimum=1, maximum=64, step=1, advanced=True, group="batch")
    grad_accum: int = option(1, "Gradient accumulation", "Micro-batches per optimiser step.",
                             minimum=1, maximum=1024, step=1, advanced=True, group="batch")
    grad_clip: float = option(0.0, "Gradient clip (norm)", "0 for off.", minimum=0.0, maximum=1000.0, advanced=True,
                              group="batch")
    ema_pos: float = option(0.0, "EMA decay of S^p", "0 for off; e.g. 0.99. The EMA vectors are saved.",
                            minimum=0.0, maximum=0.99999, advanced=True, group="ema")
    ema_neg: float = option(0.0, "EMA decay of S^n", minimum=0.0, maximum=0.99999, advanced=True, group="ema")
    neg_noise: float = option(1e-3, "S^n init noise", "Std of the noise added to the empty-text init.",
                              minimum=0.0, maximum=1.0, advanced=True, group="init")
    unet_lr_pos: float = option(1e-4, "UNet adapter lr, phi^p", minimum=0.0, maximum=1.0, advanced=True,
                                group="adapter_lr")
    unet_lr_neg: float = option(4e-5, "UNet adapter lr, phi^n", "Low, so that phi^n does not collapse.",
                                minimum=0.0, maximum=1.0, advanced=True, group="adapter_lr")
    text_lr: float = option(2e-5, "Text-encoder adapter lr", minimum=0.0, maximum=1.0, advanced=True,
                            group="adapter_lr")
    unet_rank: float = option(0.01875, "UNet adapter rank (share of width)",
                              "Each UNet layer's rank is this share of its output width, at least 1.",
                              minimum=0.0001, maximum=1.0, advanced=True, group="adapter_shape")
    text_rank: int = option(2, "Text-encoder adapter rank", minimum=1, maximum=128, step=1, advanced=True,
                            group="adapter_shape")
    adapter_dropout: float = option(0.1, "Adapter dropout", minimum=0.0, maximum=0.9, advanced=True,
                                    group="adapter_shape")
    gradient_checkpointing: bool = option(False, "Gradient checkpointing", "Less memory, slower.", advanced=True,
                                          group="memory")
    file_format: str = option("pt", "File format", choices=FILE_FORMATS, advanced=True, group="files")
    overwrite: bool = option(False, "Overwrite existing pair", advanced=True, group="files")
    resume: bool = option(False, "Resume", "Continue a saved pair of this name, with its optimiser state.",
                          advanced=True, group="files")

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, _checked(f, getattr(self, f.name)))
            except InputError as e:
                problems.append(str(e))
        if not problems:
            for check in (lambda: validate_name(self.name), self._check_size):
                try:
                    check()
                except InputError as e:
                    problems.append(str(e))
        try:
            self.gamma_schedule: GammaSchedule = parse_gamma(self.gamma)
        except InputError as e:
            problems.append(str(e))
        try:
            self.template_lines: tuple[str, ...] = template_lines(self.template)
        except InputError as e:
            problems.append(str(e))
        if problems:
            raise InputError(" ".join(dict.fromkeys(problems)))

    def _check_size(self) -> None:
        if self.width % 8 or self.height % 8:
            raise InputError(f"Width and height must be multiples of 8; got {self.width}x{self.height}.")
        if any(0 < side < 64 for side in (self.width, self.height)):
            raise InputError(f"Width and height must be 0 (the model's own size) or at least 64; got "
                             f"{self.width}x{self.height}.")

    def size_for(self, image_size: int) -> tuple[int, int]:
        """(width, height) of training and previews on a model trained at ``image_size``: 0 stands for that size."""
        return self.width or image_size, self.height or image_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from user data (API JSON, the tab, saved settings); unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"Unknown option(s): {', '.join(map(str, unknown))}; the options are "
                             f"{', '.join(sorted(known))}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """``value`` in the field's type (gamma also takes a number), or an InputError of one sentence."""
    label, meta = f.metadata["label"], f.metadata
    if f.name == "gamma" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = repr(value) if isinstance(value, float) else str(value)
    if f.type in ("int", "float") and isinstance(value, bool):
        raise InputError(f"{label} must be a number, not {value!r}.")
    if f.type == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise InputError(f"{label} must be a whole number, not {value!r}.")
    elif f.type == "float":
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{label} must be a finite number, not {value!r}.")
        value = float(value)
    elif f.type == "bool" and not isinstance(value, bool):
        raise InputError(f"{label} must be true or false, not {value!r}.")
    elif f.type == "str" and not isinstance(value, str):
        raise InputError(f"{label} must be text, not {value!r}.")
    low, high = meta["minimum"], meta["maximum"]
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InputError(f"{label} must be {bounds}; got {value}.")
    if meta["choices"] and value not in meta["choices"]:
        raise InputError(f"{label} must be one of {', '.join(meta['choices'])}; got {value!r}.")
    return value.strip() if isinstance(value, str) and f.name != "template" else value


def fields() -> tuple[dataclasses.Field, ...]:
    """The parameters in display order, for front ends that build one control per field."""
    return dataclasses.fields(TrainConfig)
