"""Every training parameter, defined once: the tab, the API, the CLI and the trainer all read this class.

Defaults follow the DreamArtist paper (sec. 4, 5): S^p and S^n of 3 vectors, gamma 3, lr 0.0025, batch 1,
reconstruction loss on. Each field's metadata says how a front end shows it (label, help, range, choices,
whether it is folded away under "advanced").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .gamma import parse_gamma
from .names import validate_name

TEMPLATES = ("object", "style")
FILE_FORMATS = ("pt", "safetensors")


def option(default: Any, label: str, help: str = "", *, minimum: float | None = None,
           maximum: float | None = None, step: float | None = None, choices: tuple = (),
           advanced: bool = False, cli: bool = True) -> Any:
    """A dataclass field with the metadata a front end needs to show and check it."""
    meta = dict(label=label, help=help, minimum=minimum, maximum=maximum, step=step, choices=choices,
                advanced=advanced, cli=cli)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    name: str = option("", "Name", "The word you will type in prompts; the pair is NAME and NAME-neg.")
    init_words: str = option("*", "Initialization words",
                             "Words close to the concept (e.g. 'robot'); S^p starts from their embeddings.")
    pos_len: int = option(3, "Vectors in S^p", "Length of the positive pseudo-word.", minimum=1, maximum=75, step=1)
    neg_len: int = option(3, "Vectors in S^n", "Length of the negative pseudo-word.", minimum=1, maximum=75, step=1)
    gamma: str = option("3", "Gamma (training CFG)",
                        "Guidance scale of the training loss: 3 for objects, 5 for styles; "
                        "or a schedule over t such as 1.5-3.0, 1.5-3.0:cos, 1.5-3.0:cos2.")
    lr: float = option(0.0025, "Learning rate", minimum=1e-6, maximum=1.0)
    steps: int = option(1500, "Steps", "Optimiser steps.", minimum=1, maximum=100000, step=1)
    width: int = option(512, "Width", minimum=64, maximum=2048, step=8)
    height: int = option(512, "Height", minimum=64, maximum=2048, step=8)
    reconstruction: bool = option(True, "Reconstruction loss",
                                  "Decode the predicted z0 and compare it with the reference (eq. 6). "
                                  "Better fidelity, more memory.")
    rec_weight: float = option(1.0, "Reconstruction weight", minimum=0.0, maximum=100.0)
    template: str = option("object", "Prompt template",
                           "'object', 'style', or a template file with [name] (and [filewords]) per line.")
    seed: int = option(0, "Seed", "-1 for a random seed.", minimum=-1, maximum=2**32 - 1, step=1)
    preview_every: int = option(0, "Preview every N steps", "0 for none.", minimum=0, step=1)
    save_every: int = option(0, "Save every N steps", "0 saves only at the end.", minimum=0, step=1)
    # Advanced
    neg_lr_mult: float = option(1.0, "S^n lr multiplier", minimum=0.0, maximum=100.0, advanced=True)
    beta1: float = option(0.9, "Adam beta1", minimum=0.0, maximum=0.9999, advanced=True)
    beta2: float = option(0.999, "Adam beta2", minimum=0.0, maximum=0.99999, advanced=True)
    weight_decay: float = option(0.0, "Weight decay", minimum=0.0, maximum=1.0, advanced=True)
    batch_size: int = option(1, "Batch size", minimum=1, maximum=64, step=1, advanced=True)
    grad_accum: int = option(1, "Gradient accumulation", "Micro-batches per optimiser step.",
                             minimum=1, maximum=1024, step=1, advanced=True)
    grad_clip: float = option(0.0, "Gradient clip (norm)", "0 for off.", minimum=0.0, advanced=True)
    ema_pos: float = option(0.0, "EMA decay of S^p", "0 for off; e.g. 0.99. The EMA vectors are saved.",
                            minimum=0.0, maximum=0.99999, advanced=True)
    ema_neg: float = option(0.0, "EMA decay of S^n", minimum=0.0, maximum=0.99999, advanced=True)
    neg_noise: float = option(1e-3, "S^n init noise", "Std of the noise added to the empty-text init.",
                              minimum=0.0, maximum=1.0, advanced=True)
    gradient_checkpointing: bool = option(False, "Gradient checkpointing", "Less memory, slower.", advanced=True)
    file_format: str = option("pt", "File format", choices=FILE_FORMATS, advanced=True)
    overwrite: bool = option(False, "Overwrite existing pair", advanced=True)
    resume: bool = option(False, "Resume", "Continue a saved pair of this name, with its optimiser state.",
                          advanced=True)

    def __post_init__(self) -> None:
        validate_name(self.name)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            label = f.metadata["label"]
            if f.type in ("int", "float") and isinstance(value, bool):
                raise InputError(f"{label} must be a number, not {value!r}.")
            if f.type == "int":
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                    setattr(self, f.name, value)
                if not isinstance(value, int):
                    raise InputError(f"{label} must be a whole number, not {value!r}.")
            elif f.type == "float":
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise InputError(f"{label} must be a finite number, not {value!r}.")
                setattr(self, f.name, float(value))
            elif f.type == "bool" and not isinstance(value, bool):
                raise InputError(f"{label} must be true or false, not {value!r}.")
            elif f.type == "str" and not isinstance(value, str):
                raise InputError(f"{label} must be text, not {value!r}.")
            lo, hi = f.metadata["minimum"], f.metadata["maximum"]
            if lo is not None and value < lo or hi is not None and value > hi:
                bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                raise InputError(f"{label} must be {bounds}; got {value}.")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise InputError(f"{label} must be one of {', '.join(f.metadata['choices'])}; got {value!r}.")
        if self.width % 8 or self.height % 8:
            raise InputError(f"Width and height must be multiples of 8; got {self.width}x{self.height}.")
        parse_gamma(self.gamma)
        if not self.template.strip():
            raise InputError("Prompt template is empty: use 'object', 'style' or a template file.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from user data (API JSON, saved settings); unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"Unknown parameter(s): {', '.join(unknown)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def fields() -> tuple[dataclasses.Field, ...]:
    """The parameters in display order, for front ends that build one control per field."""
    return dataclasses.fields(TrainConfig)
