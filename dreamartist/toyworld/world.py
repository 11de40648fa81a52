"""The toy world's attributes, its plain-word captions and the splits held out from pretraining.

A scene is one shape in one colour on a coloured background with a pattern. The concept a one-shot run
learns is the object (shape and colour); the background colour and pattern are the context a prompt changes.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from dreamartist.templates import OBJECT_TEMPLATES

SHAPES = ("circle", "square", "triangle", "heart", "star", "cross", "diamond", "moon")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
BACKGROUNDS = COLOURS  # the same words name the background's colour
PATTERNS = ("plain", "striped", "dotted", "checkered", "grid", "zigzag")
ATTRIBUTES = ("shape", "colour", "background", "pattern")
VALUES = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS, "pattern": PATTERNS}
CONCEPT_ATTRIBUTES = ("shape", "colour")  # what a one-shot pair should keep; the rest is context

# Objects never rendered in pretraining, in any context: the one-shot benchmark's concepts.
HELD_OUT_CONCEPTS = (("star", "purple"), ("heart", "green"), ("moon", "orange"), ("cross", "pink"))
# Share of the remaining scenes (all four attributes fixed) kept out of pretraining for the base-model bar.
HELD_OUT_SHARE = 0.06
SPLIT_SEED = 20240601

# Caption variation during pretraining, so that partial prompts ("a NAME on a green background") and the
# trainer's object templates ("a photo of a NAME") are in distribution.
P_EMPTY = 0.1  # classifier-free guidance: the caption is dropped
P_OMIT = 0.15  # each of colour, background, pattern is left out of the caption
P_COLOUR_AFTER = 0.25  # "a heart in red" instead of "a red heart"
P_TEMPLATE = 0.3  # wrapped in one of the trainer's object templates


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    pattern: str

    def __post_init__(self) -> None:
        for attribute in ATTRIBUTES:
            if getattr(self, attribute) not in VALUES[attribute]:
                raise ValueError(f"unknown {attribute} {getattr(self, attribute)!r}")
        if self.colour == self.background:
            raise ValueError("the object and the background must differ in colour")

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    def labels(self) -> tuple[int, ...]:
        """Index of each attribute's value, in ATTRIBUTES order (the classifier's targets)."""
        return tuple(VALUES[a].index(getattr(self, a)) for a in ATTRIBUTES)

    @property
    def concept(self) -> tuple[str, str]:
        return self.shape, self.colour


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The canonical caption: 'a red heart on a blue background, striped'."""
    return describe(scene.shape, scene.colour, scene.background, scene.pattern)


def describe(shape: str, colour: str | None = None, background: str | None = None, pattern: str | None = None,
             colour_after: bool = False) -> str:
    """A caption naming only the given attributes ('a heart in red, striped'); ``shape`` may be a pseudo-word."""
    if colour and not colour_after:
        text = f"{article(colour)} {colour} {shape}"
    else:
        text = f"{article(shape)} {shape}" + (f" in {colour}" if colour else "")
    if background:
        text += f" on {article(background)} {background} background"
        if pattern:
            text += f", {pattern}"
    elif pattern:
        text += f" on {article(pattern)} {pattern} background"
    return text


def random_caption(scene: Scene, rng: random.Random) -> str:
    """A pretraining caption: sometimes empty, with attributes left out, phrased or wrapped differently."""
    if rng.random() < P_EMPTY:
        return ""
    colour, background, pattern = (None if rng.random() < P_OMIT else v
                                   for v in (scene.colour, scene.background, scene.pattern))
    text = describe(scene.shape, colour, background, pattern, colour_after=rng.random() < P_COLOUR_AFTER)
    if rng.random() < P_TEMPLATE:
        body = text.split(" ", 1)[1]  # without the article: the template brings its own
        text = rng.choice(OBJECT_TEMPLATES).replace("[name]", body)
    return text


def all_scenes() -> list[Scene]:
    """Every valid scene (object colour differs from the background colour), in a fixed order."""
    return [Scene(*values) for values in itertools.product(SHAPES, COLOURS, BACKGROUNDS, PATTERNS)
            if values[1] != values[2]]


def held_out_scenes() -> list[Scene]:
    """The scenes kept out of pretraining for the base-model bar (objects seen, these combinations not)."""
    candidates = [s for s in all_scenes() if s.concept not in HELD_OUT_CONCEPTS]
    rng = random.Random(SPLIT_SEED)
    return sorted(rng.sample(candidates, round(HELD_OUT_SHARE * len(candidates))), key=all_scenes().index)


def training_scenes() -> list[Scene]:
    """The scenes pretraining renders: all but the held-out combinations and the held-out concepts."""
    excluded = set(held_out_scenes())
    return [s for s in all_scenes() if s not in excluded and s.concept not in HELD_OUT_CONCEPTS]

# One reference scene per held-out concept: the one-shot benchmark's references (the first is the demo's).
CONCEPT_REFERENCES = (
    Scene("star", "purple", "yellow", "dotted"),
    Scene("heart", "green", "pink", "striped"),
    Scene("moon", "orange", "blue", "checkered"),
    Scene("cross", "pink", "white", "grid"),
)
REFERENCE_SEED = 7  # the render seed of each reference image
