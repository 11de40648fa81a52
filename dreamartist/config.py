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
from .gamma import parse_gamma
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


# Options both modes have, defined once: name -> (default, label, help, metadata).
_COMMON: dict[str, tuple] = {
    "seed": (0, "Seed", "-1 for a random seed.", dict(minimum=-1, maximum=2**32 - 1, step=1, group="run")),
    "width": (0, "Width", "0: the model's own size (512 for SD1/SD2, 1024 for SDXL).",
              dict(minimum=0, maximum=2048, step=8, group="size")),
    "height": (0, "Height", "0: the model's own size (512 for SD1/SD2, 1024 for SDXL).",
               dict(minimum=0, maximum=2048, step=8, group="size")),
    "preview_every": (0, "Preview every N steps", "0 for none.", dict(minimum=0, maximum=MAX_STEPS, step=1,
                                                                      group="outputs")),
    "save_every": (0, "Save every N steps", "0 saves only at the end.", dict(minimum=0, maximum=MAX_STEPS, step=1,
                                                                             group="outputs")),
    "weight_decay": (0.0, "Weight decay", "", dict(minimum=0.0, maximum=1.0, advanced=True, group="optimiser")),
    "beta1": (0.9, "Adam beta1", "", dict(minimum=0.0, maximum=0.9999, advanced=True, group="betas")),
    "beta2": (0.999, "Adam beta2", "", dict(minimum=0.0, maximum=0.99999, advanced=True, group="betas")),
    "batch_size": (1, "Batch size", "", dict(minimum=1, maximum=64, step=1, advanced=True, group="batch")),
    "grad_accum": (1, "Gradient accumulation", "Micro-batches per optimiser step.",
                   dict(minimum=1, maximum=1024, step=1, advanced=True, group="batch")),
    "grad_clip": (0.0, "Gradient clip (norm)", "0 for off.", dict(minimum=0.0, maximum=1000.0, advanced=True,
                                                                 group="batch")),
}


def common(name: str) -> Any:
    """A fresh field for the option ``name`` both modes share."""
    default, label, help_text, meta = _COMMON[name]
    return option(default, label, help_text, **meta)


class Options:
    """What every options dataclass shares: building from user data, and back."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from user data (API JSON, the tab, saved settings); unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"Unknown option(s): {', '.join(map(str, unknown))}; the options are "
                             f"{', '.join(sorted(known))}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def size_for(self, image_size: int) -> tuple[int, int]:
        """(width, height) of training and previews on a model trained at ``image_size``: 0 stands for that size."""
        return self.width or image_size, self.height or image_size


@dataclass
class TrainConfig(Options):
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
    seed: int = common("seed")
    width: int = common("width")
    height: int = common("height")
    reconstruction: bool = option(True, "Reconstruction loss",
                                  "Decode the predicted z0 and compare it with the reference (eq. 6). "
                                  "Better fidelity, more memory.", group="reconstruction")
    rec_weight: float = option(1.0, "Reconstruction weight", minimum=0.0, maximum=100.0, group="reconstruction")
    template: str = option("object", "Prompt template",
                           "'object', 'style', or your own lines, one per line, each with [name] "
                           "(and [filewords] for a caption).", group="template")
    preview_every: int = common("preview_every")
    save_every: int = common("save_every")
    adapters: bool = option(False, "PN adapters (DreamArtist++)",
                            "Also train a LoRA for each CFG branch: phi^p on the S^p rows, phi^n on the S^n rows. "
                            "Stronger likeness, larger files.", group="adapters")
    # Advanced
    neg_lr_mult: float = option(1.0, "S^n lr multiplier", minimum=0.0, maximum=100.0, advanced=True,
                                group="optimiser")
    weight_decay: float = common("weight_decay")
    beta1: float = common("beta1")
    beta2: float = common("beta2")
    batch_size: int = common("batch_size")
    grad_accum: int = common("grad_accum")
    grad_clip: float = common("grad_clip")
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
        validate(self, checks=(lambda: validate_name(self.name), lambda: check_size(self.width, self.height)),
                 parsers={"gamma_schedule": lambda: parse_gamma(self.gamma),
                          "template_lines": lambda: template_lines(self.template)})


# The attention loss's layers, named by their grid at 512 px: cross-attention at half (and a quarter of) the latent side
ATTENTION_LAYERS = ("32x32", "16x16+32x32")
ATTENTION_LEVELS = {"32x32": frozenset({1}), "16x16+32x32": frozenset({1, 2})}
IDENTITY_TEMPLATE = "a photo of the face of [name]"


@dataclass
class IdentityConfig(Options):
    """Identity mode (Beyond Inserting): defaults from the paper (5 stages x {K, V}, lr 0.005, lambda 0.003, the
    reference prompt "a photo of the face of person") and, where it leaves a value open, methods.md's reading."""

    name: str = option("", "Name", "The word you will type in prompts for this identity.", group="concept")
    class_word: str = option("person", "Class word",
                             "One word for what the identity is: the module's fixed input and, in the template, the "
                             "reference prompt's word ('a photo of the face of person').", group="concept")
    template: str = option(IDENTITY_TEMPLATE, "Prompt template",
                           "One or more lines with [name]; the reference prompt is the same line with the class "
                           "word.", group="template")
    stages: int = option(5, "Stages", "Token pairs over the timesteps; 1 is the one-pair ablation.", minimum=1,
                         maximum=10, step=1, group="tokens")
    kv_split: bool = option(True, "K/V split", "A key and a value token per stage; off: one token serves both.",
                            group="tokens")
    attention_weight: float = option(0.003, "Attention loss weight (lambda)",
                                     "Face-wise attention loss against the reference prompt's maps; 0 for none.",
                                     minimum=0.0, maximum=10.0, group="attention")
    attention_layers: str = option("32x32", "Attention loss layers", "The cross-attention layers the loss reads "
                                   "(named by their grid at 512 px).", choices=ATTENTION_LAYERS, group="attention")
    lr: float = option(0.005, "Learning rate", minimum=1e-6, maximum=1.0, group="run")
    steps: int = option(800, "Steps", "Optimiser steps.", minimum=1, maximum=MAX_STEPS, step=1, group="run")
    seed: int = common("seed")
    width: int = common("width")
    height: int = common("height")
    augment: bool = option(True, "Augmentation", "Colour jitter, horizontal flip and random scaling of the face.",
                           group="outputs")
    preview_every: int = common("preview_every")
    save_every: int = common("save_every")
    # Advanced
    attention_reduction: str = option("sum", "Attention loss reduction",
                                      "sum: over pixels and tokens, as the paper; mean: over every element.",
                                      choices=("sum", "mean"), advanced=True, group="attention_more")
    weight_decay: float = common("weight_decay")
    beta1: float = common("beta1")
    beta2: float = common("beta2")
    batch_size: int = common("batch_size")
    grad_accum: int = common("grad_accum")
    grad_clip: float = common("grad_clip")
    export_embedding: bool = option(False, "Also write an ordinary embedding",
                                    "NAME-identity: the mean key token, for a webui without this extension (lossy).",
                                    advanced=True, group="files")
    overwrite: bool = option(False, "Overwrite existing identity", advanced=True, group="files")
    resume: bool = option(False, "Resume", "Continue a saved identity of this name, with its optimiser state.",
                          advanced=True, group="files")

    gradient_checkpointing = False  # the attention loss reads maps a checkpointed forward would not keep

    def __post_init__(self) -> None:
        validate(self, checks=(lambda: validate_name(self.name), lambda: check_size(self.width, self.height),
                               self._check_class_word),
                 parsers={"template_lines": lambda: template_lines(self.template)})

    def _check_class_word(self) -> None:
        if not self.class_word or len(self.class_word.split()) != 1:
            raise InputError(f"The class word must be one word (e.g. person); got {self.class_word!r}.")

    @property
    def attention_levels(self) -> frozenset[int]:
        return ATTENTION_LEVELS[self.attention_layers]


def validate(options: Any, checks: tuple = (), parsers: dict | None = None) -> None:
    """Every field of ``options`` in its type and range (``_checked``), then ``checks`` once the fields are sound, then
    each parser's result set as an attribute; all problems raised together as one InputError."""
    problems = []
    for f in dataclasses.fields(options):
        try:
            setattr(options, f.name, _checked(f, getattr(options, f.name)))
        except InputError as e:
            problems.append(str(e))
    for check in checks if not problems else ():
        try:
            check()
        except InputError as e:
            problems.append(str(e))
    for attribute, parse in (parsers or {}).items():
        try:
            setattr(options, attribute, parse())
        except InputError as e:
            problems.append(str(e))
    if problems:
        raise InputError(" ".join(dict.fromkeys(problems)))


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8:
        raise InputError(f"Width and height must be multiples of 8; got {width}x{height}.")
    if any(0 < side < 64 for side in (width, height)):
        raise InputError(f"Width and height must be 0 (the model's own size) or at least 64; got {width}x{height}.")


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
