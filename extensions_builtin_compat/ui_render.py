"""HTML the DreamArtist tab shows: the result line, error lines and an inline SVG loss curve."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

CURVE_POINTS = 200  # an SVG polyline stays light however many steps ran
_WIDTH, _HEIGHT = 300, 100


def error_html(message: str) -> str:
    return f"<p class='dreamartist-error'>{html.escape(message)}</p>"


_USAGE = {
    True: "Type {name} in your prompt; {negative} is added to the negative prompt automatically.",
    False: "Type {name} in your prompt and {negative} in your negative prompt.",
}


def result_html(name: str, negative: str, files: Sequence[Path], steps: int, total: int,
                final_loss: float | None, stopped: str, auto_negative: bool) -> str:
    """The result line: how to use the pair, then what was written."""
    usage = _USAGE[auto_negative].format(name=f"<code>{html.escape(name)}</code>",
                                         negative=f"<code>{html.escape(negative)}</code>")
    unit = "step" if (total if stopped else steps) == 1 else "steps"
    done = f"Trained {steps} of {total} {unit} ({html.escape(stopped)})" if stopped else f"Trained {steps} {unit}"
    if final_loss is not None and math.isfinite(final_loss):
        done += f", final loss {final_loss:.4f}"
    written = ", ".join(html.escape(Path(f).name) for f in files) or "nothing"
    return f"<p>{usage}</p><p>{done}. Saved: {written}.</p>"


def _downsample(values: Sequence[float], points: int) -> list[float]:
    """Means of ``points`` equal buckets (or the values themselves when there are fewer)."""
    if len(values) <= points:
        return list(values)
    size = len(values) / points
    return [sum(chunk) / len(chunk) for chunk in
            (values[int(i * size):max(int((i + 1) * size), int(i * size) + 1)] for i in range(points))]


def loss_curve_html(losses: Sequence[float]) -> str:
    """An SVG line of the loss per step, scaled to its own range, with the first, last and lowest values."""
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < 2:
        return ""
    curve = _downsample(finite, CURVE_POINTS)
    low, high = min(curve), max(curve)
    span = high - low or 1.0
    step = _WIDTH / (len(curve) - 1)
    points = " ".join(f"{i * step:.1f},{_HEIGHT - (v - low) / span * _HEIGHT:.1f}" for i, v in enumerate(curve))
    svg = (f"<svg viewBox='0 0 {_WIDTH} {_HEIGHT}' preserveAspectRatio='none' role='img' "
           f"aria-label='loss curve'><polyline points='{points}'/></svg>")
    caption = (f"<div class='dreamartist-axis'>loss over {len(losses)} steps: first {finite[0]:.4f}, "
               f"last {finite[-1]:.4f}, lowest {min(finite):.4f}</div>")
    return svg + caption
