"""One-shot quality on the toy world: positive-only textual inversion against DreamArtist pairs.

    python benchmarks/quality.py            # the full benchmark: 3 held-out concepts x 3 seeds per method
    python benchmarks/quality.py --quick    # a one-minute version (CI): the figures come out and lie in range
    python benchmarks/quality.py --base     # the base model's per-attribute accuracy on held-out combinations

Every method trains one pair from one reference render of a concept held out from pretraining
(dreamartist.toyworld.world.CONCEPT_REFERENCES), through dreamartist.trainer at matched steps, with the
trainer's defaults otherwise (S^p and S^n of 3 vectors, lr 0.0025, reconstruction loss, the object template).
Textual inversion is DreamArtist at gamma 1: eps_hat = eps_n + 1 * (eps_p - eps_n) = eps_p, so S^n gets no
gradient and never moves (weight decay is 0); it is sampled with the ordinary empty negative prompt, the
DreamArtist pairs with NAME-neg as the negative prompt, as the webui extension does. DreamArtist + adapters
(DreamArtist++, `adapters=True`) samples as `python -m dreamartist generate` does by default: phi^p on the
prompt's rows, S^n and phi^n on the negative prompt's, at the CLI's default strengths. All methods sample at
the same CFG scale (the toy model's, dreamartist.toyworld.evaluate.GUIDANCE) with the same seeds.

Figures, read by the shipped attribute classifier from the images of each saved checkpoint:
  fidelity  the prompt is just NAME: share of the reference's shape and colour reproduced
  control   prompts that change one attribute ("a NAME on a green background", "a NAME on a striped
            background", "a NAME in blue"): share of images showing the asked value
  leak      the same prompts: share of images showing the reference's value where another was asked
  kept      the same prompts: share of the concept's other attributes (shape; colour unless asked) kept
  steps     the first checkpoint where fidelity >= FIDELITY_OK and control >= CONTROL_OK (a usable pair)
Table: mean +- standard deviation over seeds (each seed averaged over the concepts first).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist import pairfiles  # noqa: E402
from dreamartist.config import TrainConfig  # noqa: E402
from dreamartist.images import prepare_reference  # noqa: E402
from dreamartist.names import negative_name  # noqa: E402
from dreamartist.toyworld.evaluate import GUIDANCE, generate  # noqa: E402
from dreamartist.toyworld.render import render  # noqa: E402
from dreamartist.toyworld.world import (  # noqa: E402
    ATTRIBUTES,
    CONCEPT_REFERENCES,
    REFERENCE_SEED,
    VALUES,
    Scene,
    describe,
)
from dreamartist.trainer import Progress, Trainer  # noqa: E402

NAME = "toyobj"
FIDELITY_OK = 0.75
CONTROL_OK = 0.6
METRICS = ("fidelity", "control", "leak", "kept")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Method:
    """How one method trains (TrainConfig fields) and samples (with NAME-neg as the negative prompt or not)."""

    label: str
    config: dict = field(default_factory=dict)
    negative: bool = True


# The methods compared, at matched steps.
METHODS: dict[str, Method] = {
    "ti": Method("textual inversion", {"gamma": "1"}, negative=False),
    "da3": Method("DreamArtist gamma 3", {"gamma": "3"}),
    "da5": Method("DreamArtist gamma 5", {"gamma": "5"}),
    "da3_adapters": Method("DreamArtist gamma 3 + adapters", {"gamma": "3", "adapters": True}),
}
ADAPTER_STRENGTHS = (0.8, 0.65)  # phi^p, phi^n: the defaults of `python -m dreamartist generate`


@dataclass(frozen=True)
class Plan:
    """How much to run: concepts, seeds, training steps, evaluation checkpoints and samples."""

    concepts: tuple[Scene, ...] = CONCEPT_REFERENCES[:3]
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    eval_every: int = 100
    samples: int = 4  # per prompt
    sample_steps: int = 20  # DDIM steps
    edits_per_attribute: int = 1


FULL = Plan()
QUICK = Plan(concepts=CONCEPT_REFERENCES[:1], seeds=(0,), steps=20, eval_every=10, samples=2, sample_steps=8,
             edits_per_attribute=1)

# Values asked for in the control prompts, in order of preference (the reference's own values are skipped).
EDIT_ORDER = {"background": ("green", "blue", "red", "white", "yellow"),
              "pattern": ("striped", "checkered", "dotted", "plain"),
              "colour": ("blue", "red", "green", "yellow", "white")}


def control_prompts(reference: Scene, per_attribute: int) -> list[tuple[str, str, str]]:
    """(prompt, attribute, asked value) for prompts that change one attribute of the reference."""
    prompts = []
    for attribute, order in EDIT_ORDER.items():
        taken = {reference.value(attribute), reference.colour, reference.background}
        for value in [v for v in order if v not in taken][:per_attribute]:
            if attribute == "colour":
                prompts.append((describe(NAME, colour=value, colour_after=True), attribute, value))
            else:
                prompts.append((describe(NAME, **{attribute: value}), attribute, value))
    return prompts


def adapter_patches(groups: dict | None) -> dict:
    """What the sampler installs for a pair's adapters: phi^p on the prompt's rows, phi^n on the negative's."""
    from dreamartist.adapters import TEXT, UNET, unflatten

    if not groups:
        return {}
    patches = {part: {f"{NAME}:{branch}": (unflatten(groups[f"{part}_{branch}"]), strength)
                      for branch, strength in zip(("pos", "neg"), ADAPTER_STRENGTHS) if f"{part}_{branch}" in groups}
               for part in (UNET, TEXT)}
    labels = (frozenset({f"{NAME}:neg"}), frozenset({f"{NAME}:pos"}))
    return {"patches": patches, "labels": labels}


def score_pair(backend, classifier, reference: Scene, words: dict, negative: bool, plan: Plan,
               adapters: dict | None = None) -> dict[str, float]:
    """Fidelity, control, leak and kept of one pair (see the module docstring), from fresh samples."""
    negative_prompt = negative_name(NAME) if negative else ""
    index = {a: i for i, a in enumerate(ATTRIBUTES)}
    want = torch.tensor(reference.labels())
    samples = dict(words=words, samples=plan.samples, steps=plan.sample_steps, guidance=GUIDANCE, **(adapters or {}))
    read = classifier.predict(generate(backend, NAME, negative_prompt, seed=0, **samples))
    concept = [index["shape"], index["colour"]]
    fidelity = (read[:, concept] == want[concept]).float().mean().item()
    control, leak, kept = [], [], []
    for k, (prompt, attribute, value) in enumerate(control_prompts(reference, plan.edits_per_attribute)):
        read = classifier.predict(generate(backend, prompt, negative_prompt, seed=1 + k, **samples))
        column = index[attribute]
        control += (read[:, column] == VALUES[attribute].index(value)).tolist()
        leak += (read[:, column] == want[column]).tolist()
        others = [c for c in concept if c != column]
        kept += (read[:, others] == want[others]).float().mean(dim=1).tolist()
    return {"fidelity": fidelity, "control": statistics.fmean(control), "leak": statistics.fmean(leak),
            "kept": statistics.fmean(kept)}


def run_one(backend, classifier, method: Method, reference: Scene, seed: int, plan: Plan,
            folder: Path) -> dict[int, dict[str, float]]:
    """Train one pair, scoring every saved checkpoint; returns {step: figures}."""
    image = render(reference, REFERENCE_SEED)
    config = TrainConfig(name=NAME, steps=plan.steps, width=64, height=64, seed=seed, save_every=plan.eval_every,
                         preview_every=0, overwrite=True, **method.config)
    curve: dict[int, dict[str, float]] = {}

    def on_progress(progress: Progress) -> None:
        if progress.step % plan.eval_every == 0:  # the trainer has just saved this step's pair
            pos, neg = pairfiles.load_pair(folder, NAME)
            words = {NAME: pos.vectors, negative_name(NAME): neg.vectors}
            adapters = adapter_patches(pairfiles.load_adapters(folder, NAME))
            curve[progress.step] = score_pair(backend, classifier, reference, words, method.negative, plan, adapters)

    references = [prepare_reference(image, 64, 64, vae_scale=backend.vae_scale)]
    Trainer(backend, config, references, folder, on_progress=on_progress).run()
    return curve


def usable_step(curve: dict[int, dict[str, float]]) -> int | None:
    """The first checkpoint that passes both thresholds; None when none does."""
    for step in sorted(curve):
        if curve[step]["fidelity"] >= FIDELITY_OK and curve[step]["control"] >= CONTROL_OK:
            return step
    return None


def run(plan: Plan, methods: dict[str, Method] | None = None, backend=None, classifier=None,
        log: Callable[[str], None] = print) -> dict:
    """Every method x concept x seed; returns the raw curves and the per-method summary."""
    from dreamartist.toyworld import load_backend, load_classifier

    methods = methods or METHODS
    backend = backend if backend is not None else load_backend(device="cpu")
    classifier = classifier if classifier is not None else load_classifier()
    runs = []
    for key in methods:
        for reference in plan.concepts:
            for seed in plan.seeds:
                started = time.monotonic()
                with tempfile.TemporaryDirectory(prefix="dreamartist-quality-") as folder:
                    curve = run_one(backend, classifier, methods[key], reference, seed, plan, Path(folder))
                runs.append({"method": key, "concept": asdict(reference), "seed": seed, "final": curve[max(curve)],
                             "usable_step": usable_step(curve), "curve": {str(s): v for s, v in curve.items()},
                             "seconds": round(time.monotonic() - started, 1)})
                log(_describe(runs[-1], methods))
    return {"plan": asdict(plan), "thresholds": {"fidelity": FIDELITY_OK, "control": CONTROL_OK},
            "guidance": GUIDANCE, "runs": runs, "summary": summarize(runs, methods, plan)}


def _describe(entry: dict, methods: dict[str, Method]) -> str:
    final, concept = entry["final"], entry["concept"]
    return (f"{methods[entry['method']].label:30s} {concept['colour']} {concept['shape']:8s} seed {entry['seed']}: "
            + " ".join(f"{m} {final[m]:.2f}" for m in METRICS)
            + f" usable at {entry['usable_step']} ({entry['seconds']:.0f} s)")


def summarize(runs: list[dict], methods: dict[str, Method], plan: Plan) -> dict[str, dict]:
    """Per method: mean and standard deviation over seeds of each figure (concepts averaged first)."""
    summary = {}
    for key, method in methods.items():
        mine = [r for r in runs if r["method"] == key]
        row: dict = {"label": method.label}
        for metric in METRICS:
            per_seed = [statistics.fmean(r["final"][metric] for r in mine if r["seed"] == seed) for seed in plan.seeds]
            row[metric] = {"mean": statistics.fmean(per_seed),
                           "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0}
        steps = [r["usable_step"] for r in mine]
        reached = sorted(s for s in steps if s is not None)
        row["usable"] = {"reached": len(reached), "runs": len(steps),
                         "median_step": statistics.median(reached) if reached else None}
        summary[key] = row
    return summary


def table(result: dict) -> str:
    """The summary as a markdown table."""
    plan = result["plan"]
    lines = ["| method | fidelity | control | leak | kept | usable pair (median step, runs reaching it) |",
             "|---|---|---|---|---|---|"]
    for row in result["summary"].values():
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" for m in METRICS]
        usable = row["usable"]
        median = f"{usable['median_step']:.0f}" if usable["median_step"] is not None else f"> {plan['steps']}"
        reached = f"{median} ({usable['reached']}/{usable['runs']})"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {reached} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Fidelity against control, one point per method, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for row in result["summary"].values():
        axes.errorbar(row["fidelity"]["mean"], row["control"]["mean"], xerr=row["fidelity"]["std"],
                      yerr=row["control"]["std"], fmt="o", capsize=4, label=row["label"])
    axes.axvline(FIDELITY_OK, color="grey", linewidth=0.8, linestyle=":")
    axes.axhline(CONTROL_OK, color="grey", linewidth=0.8, linestyle=":")
    axes.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="fidelity (prompt: NAME)", ylabel="control (one attribute changed)",
             title=f"One-shot concepts on the toy world, {result['plan']['steps']} steps")
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def check_ranges(result: dict) -> None:
    """Every figure is a share in [0, 1] and every usable step is a checkpoint: what --quick asserts."""
    plan = result["plan"]
    for r in result["runs"]:
        for metric in METRICS:
            if not 0.0 <= r["final"][metric] <= 1.0:
                raise AssertionError(f"{metric} {r['final'][metric]} is not in [0, 1]")
        if r["usable_step"] is not None and (r["usable_step"] % plan["eval_every"] or r["usable_step"] > plan["steps"]):
            raise AssertionError(f"usable step {r['usable_step']} is not a checkpoint")
        if sorted(int(s) for s in r["curve"]) != list(range(plan["eval_every"], plan["steps"] + 1, plan["eval_every"])):
            raise AssertionError(f"checkpoints {sorted(r['curve'])} do not match the plan")


def base(samples: int) -> dict[str, float]:
    """The base model's per-attribute accuracy on the scene combinations held out from pretraining."""
    from dreamartist.toyworld import load_backend, load_classifier
    from dreamartist.toyworld.evaluate import scene_accuracy
    from dreamartist.toyworld.world import held_out_scenes

    return scene_accuracy(load_backend(device="cpu"), load_classifier(), held_out_scenes(), samples=samples,
                          progress=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one concept, one seed, few steps (CI)")
    mode.add_argument("--base", action="store_true", help="the base model's accuracy on held-out combinations")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for quality.json/.md/.png")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seeds", type=int, default=len(FULL.seeds),
                        help=f"seeds per concept (default {len(FULL.seeds)}; fewer: shorter, with less spread)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.base:
        scores = base(samples=4)
        print(" ".join(f"{a} {scores[a]:.3f}" for a in (*ATTRIBUTES, "all")))
        return 0
    result = run(QUICK if args.quick else replace(FULL, seeds=tuple(range(args.seeds))))
    check_ranges(result)
    print(table(result))
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "quality.md").write_text(table(result) + "\n")
        plot(result, args.out / "quality.png")
        print(f"wrote {args.out / 'quality.json'}, quality.md, quality.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
