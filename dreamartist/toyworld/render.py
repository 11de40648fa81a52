"""Procedural renders of toy-world scenes: 64x64 RGB, drawn at 4x and box-filtered for smooth edges.

Each render jitters the object's position, size and rotation and the pattern's phase, so no two renders of
a scene are the same; the same seed always gives the same pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import Scene

SIZE = 64
SUPERSAMPLE = 4
RGB = {
    "red": (215, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 40), "green": (45, 165, 65),
    "blue": (40, 90, 220), "purple": (135, 55, 185), "pink": (245, 125, 195), "white": (245, 245, 245),
}
OUTLINE = (35, 35, 35)
JITTER = 5.0  # pixels the object's centre moves
RADIUS = (15.0, 19.0)  # the object's outer radius in pixels
TILT = 12.0  # degrees of rotation either way


def _circle(n: int = 48, radius: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(2 * math.pi * i / n), cy + radius * math.sin(2 * math.pi * i / n))
            for i in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    corners = []
    for i in range(2 * points):
        r, a = (1.0 if i % 2 == 0 else inner), math.pi * i / points - math.pi / 2
        corners.append((r * math.cos(a), r * math.sin(a)))
    return corners


def _heart(n: int = 48) -> list[tuple[float, float]]:
    points = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17.0, -(y + 2.5) / 17.0))
    return points


_CROSS_ARM, _CROSS_REACH = 0.32, 0.95
# Each shape is a list of (polygon in unit coordinates, value): 255 fills, 0 cuts out (the moon's bite).
SHAPE_POLYGONS = {
    "circle": [(_circle(), 255)],
    "square": [([(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)], 255)],
    "triangle": [([(0.0, -1.0), (0.95, 0.7), (-0.95, 0.7)], 255)],
    "heart": [(_heart(), 255)],
    "star": [(_star(), 255)],
    "cross": [([(-_CROSS_ARM, -_CROSS_REACH), (_CROSS_ARM, -_CROSS_REACH), (_CROSS_ARM, -_CROSS_ARM),
                (_CROSS_REACH, -_CROSS_ARM), (_CROSS_REACH, _CROSS_ARM), (_CROSS_ARM, _CROSS_ARM),
                (_CROSS_ARM, _CROSS_REACH), (-_CROSS_ARM, _CROSS_REACH), (-_CROSS_ARM, _CROSS_ARM),
                (-_CROSS_REACH, _CROSS_ARM), (-_CROSS_REACH, -_CROSS_ARM), (-_CROSS_ARM, -_CROSS_ARM)], 255)],
    "diamond": [([(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)], 255)],
    "moon": [(_circle(), 255), (_circle(radius=0.82, cx=0.42, cy=-0.2), 0)],
}


def pattern_tone(colour: str) -> np.ndarray:
    """The pattern's colour: the background lightened, or darkened when it is already light."""
    base = np.array(RGB[colour], dtype=np.float32)
    luminance = (0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]) / 255
    target, amount = (np.zeros(3), 0.3) if luminance > 0.65 else (np.full(3, 255.0), 0.45)
    return base * (1 - amount) + target * amount


def pattern_mask(pattern: str, phase: tuple[float, float], size: int = SIZE * SUPERSAMPLE) -> np.ndarray:
    """Where the pattern's tone covers the background: (size, size) floats in {0, 1}."""
    scale = size / SIZE
    coords = (np.arange(size, dtype=np.float32) + 0.5) / scale
    x = coords[None, :] + phase[0]
    y = coords[:, None] + phase[1]
    if pattern == "plain":
        covered = np.zeros((size, size), dtype=bool)
    elif pattern == "striped":
        covered = np.broadcast_to(y % 10 < 4, (size, size))
    elif pattern == "dotted":
        covered = ((x % 10 - 5) ** 2 + (y % 10 - 5) ** 2) < 2.4**2
    elif pattern == "checkered":
        covered = (np.floor(x / 8) + np.floor(y / 8)) % 2 == 0
    elif pattern == "grid":
        covered = (x % 10 < 1.6) | (y % 10 < 1.6)
    elif pattern == "zigzag":
        wave = np.abs((x % 12) - 6) * (3.5 / 6)  # triangle wave, 3.5 px high
        covered = (y + wave) % 10 < 2.5
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.ascontiguousarray(covered, dtype=np.float32)


def object_mask(shape: str, centre: tuple[float, float], radius: float, angle: float,
                size: int = SIZE * SUPERSAMPLE) -> Image.Image:
    """The object's coverage as an 'L' image at render resolution."""
    scale = size / SIZE
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, value in SHAPE_POLYGONS[shape]:
        points = [((centre[0] + radius * (px * cos - py * sin)) * scale,
                   (centre[1] + radius * (px * sin + py * cos)) * scale) for px, py in polygon]
        draw.polygon(points, fill=value)
    return mask


def dilate(mask: np.ndarray, reach: int) -> np.ndarray:
    """Grow a (H, W, 1) mask by ``reach`` pixels each way (a square max filter, separable)."""
    grown = mask.copy()
    for axis in (0, 1):
        source = grown.copy()
        for shift in range(1, reach + 1):
            for step in (shift, -shift):
                np.maximum(grown, np.roll(source, step, axis=axis), out=grown)
    return grown


@dataclass(frozen=True)
class Layout:
    """Where a render puts its object and its pattern: what the seed fixes."""

    centre: tuple[float, float]
    radius: float
    angle: float
    phase: tuple[float, float]


def layout(scene: Scene, seed: int) -> Layout:
    """The layout ``render_array(scene, seed)`` draws (a circle is never tilted, so it draws no angle)."""
    rng = np.random.default_rng(seed)
    centre = tuple(SIZE / 2 + rng.uniform(-JITTER, JITTER, 2))
    radius = rng.uniform(*RADIUS)
    angle = 0.0 if scene.shape == "circle" else rng.uniform(-TILT, TILT)
    phase = tuple(rng.uniform(0, 24, 2))
    return Layout(centre, radius, angle, phase)


def draw(scene: Scene, where: Layout) -> np.ndarray:
    """``scene`` drawn at ``where`` as (64, 64, 3) uint8; with another scene's layout, the same render edited in its
    attributes (the object stays where it was)."""
    covered = pattern_mask(scene.pattern, where.phase)[..., None]
    background = np.array(RGB[scene.background], dtype=np.float32)
    pixels = background * (1 - covered) + pattern_tone(scene.background) * covered
    shape = object_mask(scene.shape, where.centre, where.radius, where.angle)
    body = np.asarray(shape, dtype=np.float32)[..., None] / 255
    outline = dilate(body, SUPERSAMPLE // 2)
    pixels = pixels * (1 - outline) + np.array(OUTLINE, dtype=np.float32) * outline
    pixels = pixels * (1 - body) + np.array(RGB[scene.colour], dtype=np.float32) * body
    pixels = pixels.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def coverage(shape: str, where: Layout) -> np.ndarray:
    """The share of each of the 64x64 pixels that the object (its outline included) covers: (64, 64) in [0, 1]."""
    body = np.asarray(object_mask(shape, where.centre, where.radius, where.angle), dtype=np.float32)[..., None] / 255
    outline = dilate(body, SUPERSAMPLE // 2)[..., 0]
    return outline.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render_array(scene: Scene, seed: int) -> np.ndarray:
    """One render of ``scene`` as (64, 64, 3) uint8; the seed fixes position, size, tilt and pattern phase."""
    return draw(scene, layout(scene, seed))


def render(scene: Scene, seed: int) -> Image.Image:
    """One render of ``scene`` as a 64x64 RGB image."""
    return Image.fromarray(render_array(scene, seed))
