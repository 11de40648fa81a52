"""What the toy-world benchmarks share: a run's identity, the range check of their summaries, a curve with its band."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .ledger import Ledger


@dataclass(frozen=True)
class Run:
    """One training run of a benchmark: a method on one unit (a concept and a training seed)."""

    method: str
    concept: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}-c{self.concept}-s{self.seed}"

    @property
    def unit(self) -> tuple[int, int]:
        return self.concept, self.seed


class Bench:
    """A benchmark's model, classifier and ledger, and its runs: every method on every unit (concept, seed), each run
    named ``<prefix><index>`` (distinct, so that runs can step together) with its folder under ``work/runs``."""

    def __init__(self, plan, work: Path, methods: dict, backend=None, classifier=None, log=print,
                 prefix: str = "toyobj"):
        from . import load_backend, load_classifier

        self.plan, self.work, self.log, self.methods = plan, Path(work), log, methods
        self.backend = backend if backend is not None else load_backend(device="cpu")
        self.classifier = classifier if classifier is not None else load_classifier()
        self.ledger = Ledger(self.work / "ledger.jsonl")
        self.runs = [Run(m, c, s) for m in methods for c in range(len(plan.concepts)) for s in plan.seeds]
        self.names = {run: f"{prefix}{i}" for i, run in enumerate(self.runs)}

    def folder(self, run: Run) -> Path:
        return self.work / "runs" / run.key


def check_interval(interval: dict, what: str) -> None:
    """AssertionError unless ``interval`` (an Interval as a dict) is empty or a share in [0, 1] holding its mean."""
    if interval["units"] and not 0 <= interval["low"] <= interval["mean"] <= interval["high"] <= 1:
        raise AssertionError(f"{what}: {interval} is not an interval in [0, 1]")


def check_methods(summary: dict) -> None:
    """Every figure of every method at every step: what a benchmark's --quick asserts."""
    for m, row in summary["methods"].items():
        for step, figs in row["steps"].items():
            for f, interval in figs.items():
                check_interval(interval, f"{m} at {step}: {f}")


def curve(ax, row: dict, checkpoints: Sequence[int], figure: str) -> None:
    """One method's ``figure`` over the checkpoints it has, its 95 % interval as a band (a matplotlib axis)."""
    xs = [s for s in checkpoints if row["steps"][str(s)][figure]["units"]]
    if not xs:
        return
    ax.plot(xs, [row["steps"][str(s)][figure]["mean"] for s in xs], marker="o", markersize=3, label=row["label"])
    ax.fill_between(xs, [row["steps"][str(s)][figure]["low"] for s in xs],
                    [row["steps"][str(s)][figure]["high"] for s in xs], alpha=0.12)
