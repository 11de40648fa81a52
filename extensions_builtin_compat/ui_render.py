"""HTML the DreamArtist tab shows: the result line, error lines and an SVG loss plot with axes."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

CURVE_POINTS = 200  # an SVG polyline stays light however many steps ran
WIDTH, HEIGHT = 360, 190
LEFT, RIGHT, TOP, BOTTOM = 52, 352, 10, 150  # the plot area inside the SVG


def error_html(message: str) -> str:
    return f"<p class='dreamartist-error'>{html.escape(message)}</p>"


_USAGE = {
    True: "Type {name} in your prompt; {negative} is added to the negative prompt automatically.",
    False: "Type {name} in your prompt and {negative} in your negative prompt.",
}


def result_html(name: str, negative: str, files: Sequence[Path], steps: int, total: int,
                final_loss: float | None, stopped: str, auto_negative: bool, notes: Sequence[str] = ()) -> str:
    """The result line: how to use the pair, then what was written (and anything the run should say)."""
    usage = _USAGE[auto_negative].format(name=f"<code>{html.escape(name)}</code>",
                                         negative=f"<code>{html.escape(negative)}</code>")
    return f"<p>{usage}</p>{run_html(files, steps, total, final_loss, stopped, notes)}"


def identity_result_html(name: str, files: Sequence[Path], steps: int, total: int, final_loss: float | None,
                         stopped: str, notes: Sequence[str] = ()) -> str:
    """The result line of an identity: how to use it, then what was written."""
    usage = f"Type <code>{html.escape(name)}</code> in your prompt to use the identity."
    return f"<p>{usage}</p>{run_html(files, steps, total, final_loss, stopped, notes)}"


def run_html(files: Sequence[Path], steps: int, total: int, final_loss: float | None, stopped: str,
             notes: Sequence[str] = ()) -> str:
    """How far a run got, what it wrote, and its notes."""
    unit = "step" if (total if stopped else steps) == 1 else "steps"
    done = f"Trained {steps} of {total} {unit} ({html.escape(stopped)})" if stopped else f"Trained {steps} {unit}"
    if final_loss is not None and math.isfinite(final_loss):
        done += f", final loss {final_loss:.4f}"
    written = ", ".join(html.escape(Path(f).name) for f in files) or "nothing"
    extra = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    return f"<p>{done}. Saved: {written}.</p>{extra}"


def _downsample(values: Sequence[float], points: int) -> list[tuple[int, float]]:
    """(step, mean finite loss) of ``points`` equal buckets (or of every step when there are fewer); steps count
    from 1; a bucket with no finite value is left out."""
    size = max(len(values) / points, 1.0)
    curve = []
    for i in range(min(points, len(values))):
        start, end = int(i * size), max(int((i + 1) * size), int(i * size) + 1)
        finite = [v for v in values[start:end] if math.isfinite(v)]
        if finite:
            curve.append((end, sum(finite) / len(finite)))
    return curve


def _ticks(low: float, high: float) -> list[float]:
    return [low, (low + high) / 2, high] if high > low else [low]


def loss_curve_html(losses: Sequence[float]) -> str:
    """A line plot of the loss per step: step on the x axis, loss on the y axis, three ticks on each."""
    curve = _downsample(losses, CURVE_POINTS)
    if len(curve) < 2:
        return ""
    low, high = min(v for _, v in curve), max(v for _, v in curve)
    first, last = curve[0][0], curve[-1][0]

    def x(step: float) -> float:
        return LEFT + (step - first) / ((last - first) or 1) * (RIGHT - LEFT)

    def y(value: float) -> float:
        return BOTTOM - (value - low) / ((high - low) or 1) * (BOTTOM - TOP)

    points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in curve)
    parts = [f"<line class='axis' x1='{LEFT}' y1='{BOTTOM}' x2='{RIGHT}' y2='{BOTTOM}'/>",
             f"<line class='axis' x1='{LEFT}' y1='{TOP}' x2='{LEFT}' y2='{BOTTOM}'/>"]
    for value in _ticks(low, high):
        parts.append(f"<text class='tick' x='{LEFT - 4}' y='{y(value) + 3:.1f}' text-anchor='end'>{value:.3g}</text>")
    for step in _ticks(first, last):
        parts.append(f"<text class='tick' x='{x(step):.1f}' y='{BOTTOM + 14}' text-anchor='middle'>"
                     f"{round(step)}</text>")
    parts.append(f"<text class='label' x='{(LEFT + RIGHT) / 2}' y='{HEIGHT - 6}' text-anchor='middle'>step</text>")
    parts.append(f"<text class='label' x='12' y='{(TOP + BOTTOM) / 2}' text-anchor='middle' "
                 f"transform='rotate(-90 12 {(TOP + BOTTOM) / 2})'>loss</text>")
    parts.append(f"<polyline points='{points}'/>")
    kept = [v for v in losses if math.isfinite(v)]
    svg = (f"<svg viewBox='0 0 {WIDTH} {HEIGHT}' role='img' aria-label='training loss per step'>"
           + "".join(parts) + "</svg>")
    caption = (f"<div class='dreamartist-axis'>loss over {len(losses)} steps: first {kept[0]:.4f}, "
               f"last {kept[-1]:.4f}, lowest {min(kept):.4f}</div>")
    return svg + caption
