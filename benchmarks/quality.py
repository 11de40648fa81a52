"""One-shot quality on the toy world: textual inversion against DreamArtist, over training steps, with intervals.

    python benchmarks/quality.py              # the full benchmark, resumable: run it again to continue
    python benchmarks/quality.py --hours 2    # stop after the piece of work that passes two hours; continue later
    python benchmarks/quality.py --quick      # a one-minute version (CI): every figure comes out and lies in range
    python benchmarks/quality.py --base       # the base model's per-attribute accuracy on held-out combinations
    python benchmarks/quality.py --probes     # DreamArtist variants that look for why it trails, to 1500 steps

Each run learns one concept held out from pretraining (dreamartist.toyworld.world.CONCEPT_REFERENCES: a purple
star, a green heart, an orange moon) from one reference render, through dreamartist.trainer with the product's
defaults unless the method says otherwise. A unit is one concept and one training seed; every method runs on
every unit, and all the runs step together (dreamartist.trainer.train_together: one UNet call a step for all of
them, the same pairs as alone). Each run is scored at every checkpoint, sampled at its own operating point:

  textual inversion   positive only (S^n gets no gradient at gamma 1 and is never sampled), no reconstruction
                      loss, the webui's TI defaults (1 vector, lr 0.005); sampled at the base model's CFG with an
                      empty negative prompt
  DreamArtist         the product's defaults (3 + 3 vectors, lr 0.0025, reconstruction loss) at gamma 3 and 5,
                      gamma 3 without the reconstruction loss, gamma 3 at a third of the lr (the lr per unit of
                      guidance TI has), and with PN adapters at the strengths the CLI ships; sampled at the
                      training gamma with NAME-neg as the negative prompt, as the webui extension does
  the concept's words a ceiling: the base model given "a purple star" where the others have NAME

and at the product's default step count on a CFG sweep as well. Scores, read by the shipped attribute classifier
(dreamartist.toyworld.metrics), per image:

  fidelity  prompts the method is used with ("a photo of a NAME": two training templates and two held out):
            the share of images showing the reference's shape AND colour
  control   "a photo of a NAME on a green background" / "on a striped background" (two values each of
            background colour and pattern, never the reference's): the share of images showing the concept AND
            the asked value; per attribute, and their mean
  leak      the same prompts, only the images showing the concept: the share keeping the reference's value
  usable    fidelity >= FIDELITY_OK and control >= CONTROL_OK; the first checkpoint where a unit gets there

The sampling noise of an image depends on its unit, prompt and sample only, so every method and checkpoint sees
the same noise. Tables give the mean over units with a 95 % bootstrap interval over units
(dreamartist.toyworld.intervals), and paired differences against textual inversion and DreamArtist gamma 3; a
difference is claimed only where its interval excludes zero.

--probes trains DreamArtist gamma 3 with one setting changed at a time (EMA, the negative's lr, one vector each,
the reconstruction weight) on the same units to 1000 and 1500 steps, into the same ledger, and compares each with
DreamArtist gamma 3 and textual inversion there (quality-probes.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist import pairfiles  # noqa: E402
from dreamartist.config import TrainConfig  # noqa: E402
from dreamartist.gamma import parse_gamma  # noqa: E402
from dreamartist.images import prepare_reference  # noqa: E402
from dreamartist.names import negative_name  # noqa: E402
from dreamartist.sampling import sample_rows, to_images  # noqa: E402
from dreamartist.toyworld.evaluate import GUIDANCE, unit_noise  # noqa: E402
from dreamartist.toyworld.intervals import Interval, bootstrap, paired  # noqa: E402
from dreamartist.toyworld.ledger import Ledger  # noqa: E402
from dreamartist.toyworld.metrics import CONTROL_OK, FIDELITY_OK, edit_scores, faithful, share  # noqa: E402
from dreamartist.toyworld.render import render  # noqa: E402
from dreamartist.toyworld.reporting import Bench, Run, check_methods, curve  # noqa: E402
from dreamartist.toyworld.world import ATTRIBUTES, CONCEPT_REFERENCES, REFERENCE_SEED, VALUES, Scene  # noqa: E402
from dreamartist.trainer import Trainer, train_together  # noqa: E402

EDITED = ("background", "pattern")  # what control changes; the concept's own shape and colour are never edited
FIGURES = ("fidelity", "control", "leak", *(f"control_{a}" for a in EDITED), *(f"leak_{a}" for a in EDITED),
           "fidelity_seen", "fidelity_unseen")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SAVE_EVERY = 250  # a run stopped mid-way continues from its last save
CEILING = "words"
REFERENCE_METHODS = ("ti", "da3")
JOBS_PER_CALL = 24  # the rows every other is compared with


@dataclass(frozen=True)
class Method:
    """How a method trains (TrainConfig fields) and samples: its CFG, NAME-neg as the negative prompt or not, and
    its adapters' strengths (phi^p, phi^n)."""

    label: str
    config: dict = field(default_factory=dict)
    cfg: float = GUIDANCE
    negative: bool = True
    strengths: tuple[float, float] = (0.8, 0.65)  # the defaults of `python -m dreamartist generate`


METHODS: dict[str, Method] = {
    "ti": Method("textual inversion", {"gamma": "1", "reconstruction": False, "pos_len": 1, "neg_len": 1,
                                       "lr": 0.005}, cfg=GUIDANCE, negative=False),
    "da3": Method("DreamArtist gamma 3", {"gamma": "3"}, cfg=3.0),
    "da5": Method("DreamArtist gamma 5", {"gamma": "5"}, cfg=5.0),
    "da3_norec": Method("DreamArtist gamma 3, no reconstruction", {"gamma": "3", "reconstruction": False}, cfg=3.0),
    "da3_lr3": Method("DreamArtist gamma 3, lr / 3", {"gamma": "3", "lr": 0.0025 / 3}, cfg=3.0),
    "da3_adapters": Method("DreamArtist gamma 3 + PN adapters", {"gamma": "3", "adapters": True}, cfg=3.0),
}
CEILING_LABEL = "the concept's own words (base model)"
# DreamArtist gamma 3 with one setting changed, where it trails textual inversion (--probes)
PROBES: dict[str, Method] = {
    "da3_ema": Method("DreamArtist gamma 3, EMA 0.99", {"gamma": "3", "ema_pos": 0.99, "ema_neg": 0.99}, cfg=3.0),
    "da3_neglr3": Method("DreamArtist gamma 3, S^n lr / 3", {"gamma": "3", "neg_lr_mult": 1 / 3}, cfg=3.0),
    "da3_len1": Method("DreamArtist gamma 3, 1 vector each", {"gamma": "3", "pos_len": 1, "neg_len": 1}, cfg=3.0),
    "da3_rec2": Method("DreamArtist gamma 3, reconstruction weight 2", {"gamma": "3", "rec_weight": 2.0}, cfg=3.0),
}

# The prompts, [name] standing for the pseudo-word (or the concept's words). Fidelity: two lines of the training
# templates and two that training never shows.
FIDELITY_PROMPTS = (("seen", "a photo of a [name]"), ("seen", "a rendering of a [name]"),
                    ("unseen", "a picture of a [name]"), ("unseen", "an image of the [name]"))
CONTROL_PROMPT = {"background": "a photo of a [name] on a {value} background",
                  "pattern": "a photo of a [name] on a {value} background"}
# Values asked for, in order of preference; the reference's own (and its object's colour) are skipped.
EDIT_ORDER = {"background": ("green", "blue", "red", "white", "yellow"),
              "pattern": ("striped", "checkered", "dotted", "plain")}


@dataclass(frozen=True)
class Plan:
    """How much to run: concepts, seeds, checkpoints, samples; the CFG sweep at ``sweep_step``."""

    concepts: tuple[Scene, ...] = CONCEPT_REFERENCES[:3]
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    checkpoints: tuple[int, ...] = (100, 250, 500, 1000, 1500, 2000, 3000)
    samples: int = 4  # per prompt
    values_per_attribute: int = 2
    sample_steps: int = 20  # DDIM steps
    sweep_step: int = 1500  # the product's default
    sweep: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 7.0)
    chunk: int = 96  # images per sampling call


FULL = Plan()
PROBE_PLAN = replace(FULL, checkpoints=(1000, 1500), sweep_step=-1)  # no CFG sweep
QUICK = Plan(concepts=CONCEPT_REFERENCES[:1], seeds=(0,), checkpoints=(10, 20), samples=1, sample_steps=6,
             sweep_step=20, sweep=(2.0, 4.0))


def prompts(reference: Scene, name: str, per_attribute: int) -> list[dict]:
    """Every prompt a run is scored on: {kind, text, attribute, value} (fidelity prompts have no attribute)."""
    out = [{"kind": kind, "text": line.replace("[name]", name), "attribute": None, "value": None}
           for kind, line in FIDELITY_PROMPTS]
    for attribute in EDITED:
        taken = {reference.value(attribute), reference.colour}
        for value in [v for v in EDIT_ORDER[attribute] if v not in taken][:per_attribute]:
            text = CONTROL_PROMPT[attribute].format(value=value).replace("[name]", name)
            out.append({"kind": "edit", "text": text, "attribute": attribute, "value": value})
    return out


def figures(reference: Scene, read: torch.Tensor, scored: list[dict], samples: int) -> dict[str, float]:
    """The run's figures from the readings of its images (``samples`` per prompt, in the order of ``scored``)."""
    flags: dict[str, list[bool]] = {"seen": [], "unseen": []}
    edits = {a: {"followed": [], "leaked": []} for a in EDITED}
    for i, prompt in enumerate(scored):
        rows = read[i * samples:(i + 1) * samples]
        if prompt["kind"] == "edit":
            scores = edit_scores(rows, reference, prompt["attribute"], prompt["value"])
            for what in ("followed", "leaked"):
                edits[prompt["attribute"]][what] += scores[what]
        else:
            flags[prompt["kind"]] += faithful(rows, reference).tolist()
    out = {"fidelity": share(flags["seen"] + flags["unseen"]), "fidelity_seen": share(flags["seen"]),
           "fidelity_unseen": share(flags["unseen"])}
    for attribute in EDITED:
        out[f"control_{attribute}"] = share(edits[attribute]["followed"])
        out[f"leak_{attribute}"] = share(edits[attribute]["leaked"])
    out["control"] = statistics.fmean(out[f"control_{a}"] for a in EDITED)
    out["leak"] = share([flag for a in EDITED for flag in edits[a]["leaked"]])
    return out


class Benchmark(Bench):
    """The runs, their folders and the ledger of finished scores; ``run()`` does what is left."""

    def __init__(self, plan: Plan, work: Path, methods: dict[str, Method] | None = None, backend=None,
                 classifier=None, log=print):
        super().__init__(plan, work, methods or METHODS, backend, classifier, log)
        self.seconds = {"training": 0.0, "sampling": 0.0}

    def spent(self, what: str, seconds: float) -> None:
        """Count ``seconds`` of ``what`` in this process and in the ledger, where every resumed part adds its own."""
        self.seconds[what] += seconds
        self.ledger.add(f"seconds@{what}@{time.time_ns()}", {"what": what, "seconds": round(seconds, 1),
                                                               "device": str(self.backend.device),
                                                               "threads": torch.get_num_threads(),
                                                               "methods": sorted(self.methods)})

    # -- training ---------------------------------------------------------------------------------------
    def saved_step(self, run: Run) -> int:
        try:
            return int(pairfiles.load_pair(self.folder(run), self.names[run])[0].step or 0)
        except Exception:  # noqa: BLE001 - no pair yet
            return 0

    def train_to(self, checkpoint: int) -> None:
        """Every run that is short of ``checkpoint`` continues to it, all of them stepping together."""
        trainers = []
        for run in self.runs:
            step = self.saved_step(run)
            if step >= checkpoint:
                continue
            reference = self.plan.concepts[run.concept]
            config = TrainConfig(name=self.names[run], steps=checkpoint, width=64, height=64, seed=run.seed,
                                 save_every=SAVE_EVERY, resume=step > 0, overwrite=step == 0,
                                 **self.methods[run.method].config)
            image = prepare_reference(render(reference, REFERENCE_SEED), 64, 64, vae_scale=self.backend.vae_scale)
            trainers.append(Trainer(self.backend, config, [image], self.folder(run)))
        if trainers:
            started = time.monotonic()
            train_together(trainers)
            self.spent("training", time.monotonic() - started)

    # -- sampling and scoring ---------------------------------------------------------------------------
    def score(self, jobs: list[tuple[str, Run | tuple[int, int], float]]) -> None:
        """Sample and score each job (ledger key, the run or a ceiling unit, CFG) in batched calls; record each."""
        from dreamartist.adapters import TEXT, UNET, unflatten

        plan, shape = self.plan, (self.backend.latent_channels, 16, 16)
        images, words, patches = [], {}, {UNET: {}, TEXT: {}}
        for index, (_, who, cfg) in enumerate(jobs):
            if isinstance(who, Run):
                method, unit, name = self.methods[who.method], who.unit, self.names[who]
                pos, neg = pairfiles.load_pair(self.folder(who), name)
                words |= {name: pos.vectors, negative_name(name): neg.vectors}
                negative = negative_name(name) if method.negative else ""
                groups = pairfiles.load_adapters(self.folder(who), name) or {}
                for part in (UNET, TEXT):
                    for branch, strength in zip(("pos", "neg"), method.strengths):
                        if f"{part}_{branch}" in groups:
                            patches[part][f"{index}:{branch}"] = (unflatten(groups[f"{part}_{branch}"]), strength)
                labels = (f"{index}:neg", f"{index}:pos") if groups else ("", "")
            else:
                unit, reference = who, plan.concepts[who[0]]
                name, negative, labels = f"{reference.colour} {reference.shape}", "", ("", "")
            for p, prompt in enumerate(prompts(plan.concepts[unit[0]], name, plan.values_per_attribute)):
                noise = unit_noise(unit, p, plan.samples, shape)
                images += [(index, prompt["text"], negative, cfg, noise[s], labels) for s in range(plan.samples)]
        started = time.monotonic()
        reads = []
        with self.backend.patched(patches):
            for start in range(0, len(images), plan.chunk):
                chunk = images[start:start + plan.chunk]
                pixels = sample_rows(
                    self.backend, [c[1] for c in chunk], [c[2] for c in chunk], words,
                    [parse_gamma(str(c[3])) for c in chunk], torch.stack([c[4] for c in chunk]), plan.sample_steps,
                    tuple(c[5][0] for c in chunk) + tuple(c[5][1] for c in chunk))
                reads.append(self.classifier.predict(to_images(pixels)))
        self.spent("sampling", time.monotonic() - started)
        read = torch.cat(reads)
        offset = 0
        for key, who, cfg in jobs:
            unit = who.unit if isinstance(who, Run) else who
            reference = self.plan.concepts[unit[0]]
            scored = prompts(reference, "x", plan.values_per_attribute)
            count = len(scored) * plan.samples
            result = figures(reference, read[offset:offset + count], scored, plan.samples)
            offset += count
            self.ledger.add(key, {"run": asdict(who) if isinstance(who, Run) else {"method": CEILING,
                                                                                   "concept": unit[0],
                                                                                   "seed": unit[1]},
                                  "cfg": cfg, **result, "read": read[offset - count:offset].tolist()})

    def jobs_at(self, checkpoint: int) -> list:
        """The scoring left to do at ``checkpoint``: every run at its own CFG, and the sweep where it is due."""
        jobs = []
        cfgs = {run: [self.methods[run.method].cfg] for run in self.runs}
        if checkpoint == self.plan.sweep_step:
            for run in self.runs:
                cfgs[run] += [c for c in self.plan.sweep if c != cfgs[run][0]]
        for run in self.runs:
            jobs += [(f"{run.key}@{checkpoint}@{cfg:g}", run, cfg) for cfg in cfgs[run]]
        return [job for job in jobs if job[0] not in self.ledger]

    def ceiling_jobs(self) -> list:
        units = [(c, s) for c in range(len(self.plan.concepts)) for s in self.plan.seeds]
        cfgs = sorted({GUIDANCE, *self.plan.sweep})
        jobs = [(f"{CEILING}-c{c}-s{s}@0@{cfg:g}", (c, s), cfg) for c, s in units for cfg in cfgs]
        return [job for job in jobs if job[0] not in self.ledger]

    def run(self, hours: float | None = None) -> bool:
        """Do what is left, checkpoint by checkpoint; returns True when everything is done. With ``hours``, stops
        after the first piece of work that ends past that budget."""
        started = time.monotonic()
        if jobs := self.ceiling_jobs():
            self.score(jobs)
        for checkpoint in self.plan.checkpoints:
            if not (jobs := self.jobs_at(checkpoint)):
                continue
            if hours is not None and time.monotonic() - started > hours * 3600:
                self.log(f"stopped before checkpoint {checkpoint}: the budget of {hours} h is spent; run again "
                         "to go on")
                return False
            self.train_to(checkpoint)
            for start in range(0, len(jobs), JOBS_PER_CALL):  # the ledger grows as the scores come
                self.score(jobs[start:start + JOBS_PER_CALL])
            self.log(f"checkpoint {checkpoint} done: training {self.seconds['training']:.0f} s, sampling "
                     f"{self.seconds['sampling']:.0f} s so far in this process")
        return True


# -- the summary ---------------------------------------------------------------------------------------------
def per_unit(records: list[dict], method: str, step: int, cfg: float, figure: str, units: list) -> list[float]:
    """One value per unit (NaN where the unit has no record)."""
    found = {(r["run"]["concept"], r["run"]["seed"]): r[figure] for r in records
             if r["run"]["method"] == method and r["step"] == step and r["cfg"] == cfg}
    return [float(found.get(u, float("nan"))) for u in units]


def summarize(ledger_records: list[dict], plan: Plan, methods: dict[str, Method]) -> dict:
    """Means with intervals per method, checkpoint and figure; paired differences; usable steps; the sweep."""
    records = [{**r, "step": int(r["key"].split("@")[1])} for r in ledger_records if "run" in r]
    units = [(c, s) for c in range(len(plan.concepts)) for s in plan.seeds]
    rows = {m: (methods[m].label, methods[m].cfg) for m in methods} | {CEILING: (CEILING_LABEL, GUIDANCE)}
    steps = {m: plan.checkpoints for m in methods} | {CEILING: (0,)}
    summary: dict = {"methods": {}, "differences": {}, "sweep": {}, "usable": {}, "seconds": {}}
    for r in ledger_records:  # the time of the runs shown (records without "methods" are the main plan's)
        if "what" in r and set(r.get("methods", METHODS)) <= set(methods):
            where = f"{r['device']}, {r['threads']} thread" + ("s" if r["threads"] != 1 else "")
            summary["seconds"].setdefault(where, {}).setdefault(r["what"], 0.0)
            summary["seconds"][where][r["what"]] += r["seconds"]
    for m, (label, cfg) in rows.items():
        summary["methods"][m] = {"label": label, "cfg": cfg, "steps": {
            str(step): {f: asdict(bootstrap(per_unit(records, m, step, cfg, f, units))) for f in FIGURES}
            for step in steps[m]}}
    for base in REFERENCE_METHODS:
        for m in methods:
            if m == base or f"{base}-{m}" in summary["differences"]:
                continue
            summary["differences"][f"{m}-{base}"] = {str(step): {
                f: asdict(paired(per_unit(records, m, step, methods[m].cfg, f, units),
                                 per_unit(records, base, step, methods[base].cfg, f, units)))
                for f in ("fidelity", "control", "leak")} for step in plan.checkpoints}
    for m in rows:
        cfgs = sorted({GUIDANCE, *plan.sweep, rows[m][1]})
        step = 0 if m == CEILING else plan.sweep_step
        summary["sweep"][m] = {f"{cfg:g}": {f: asdict(bootstrap(per_unit(records, m, step, cfg, f, units)))
                                            for f in ("fidelity", "control", "leak")} for cfg in cfgs}
    for m in methods:
        firsts = []
        for u in units:
            reached = [s for s in plan.checkpoints
                       if per_unit(records, m, s, methods[m].cfg, "fidelity", [u])[0] >= FIDELITY_OK
                       and per_unit(records, m, s, methods[m].cfg, "control", [u])[0] >= CONTROL_OK]
            firsts.append(min(reached) if reached else None)
        got = sorted(s for s in firsts if s is not None)
        summary["usable"][m] = {"reached": len(got), "units": len(units),
                                "median_step": statistics.median(got) if got else None}
    summary["parts"] = {m: {str(step): parts(records, plan, m, step, methods[m].cfg) for step in plan.checkpoints}
                        for m in methods}
    return summary


def parts(records: list[dict], plan: Plan, method: str, step: int, cfg: float) -> dict[str, float] | None:
    """What the fidelity prompts' images keep, over every unit's images (means, no intervals): the reference's shape,
    its colour, and the object drawn in the reference's background colour instead."""
    kept: dict[str, list[bool]] = {"shape": [], "colour": [], "background colour": []}
    for r in records:
        if r["run"]["method"] != method or r["step"] != step or r["cfg"] != cfg:
            continue
        reference = plan.concepts[r["run"]["concept"]]
        for reading in r["read"][:len(FIDELITY_PROMPTS) * plan.samples]:  # the fidelity prompts come first
            seen = {a: VALUES[a][i] for a, i in zip(ATTRIBUTES, reading)}
            kept["shape"].append(seen["shape"] == reference.shape)
            kept["colour"].append(seen["colour"] == reference.colour)
            kept["background colour"].append(seen["colour"] == reference.background)
    return {k: statistics.fmean(v) for k, v in kept.items()} if kept["shape"] else None


def _cell(interval: dict) -> str:
    return str(Interval(**interval))


def done_steps(summary: dict, plan: Plan) -> list[int]:
    """The checkpoints every method has been scored at on every unit."""
    rows = [row for m, row in summary["methods"].items() if m != CEILING]
    return [s for s in plan.checkpoints
            if all(row["steps"][str(s)]["fidelity"]["units"] == len(plan.concepts) * len(plan.seeds) for row in rows)]


def tables(summary: dict, plan: Plan, command: str = "python benchmarks/quality.py") -> str:
    """Markdown: fidelity and control over the steps; every figure with its interval, and the paired differences,
    at the product's default and at the last checkpoint (or the last one done); the CFG sweep; the time spent."""
    done = done_steps(summary, plan)
    shown = sorted({plan.sweep_step, *done[-1:]} & set(done))
    out = [] if done == list(plan.checkpoints) else [
        f"**Partial**: scored so far at {', '.join(map(str, done)) or 'no checkpoint'} of "
        f"{', '.join(map(str, plan.checkpoints))} steps; `{command}` goes on from there.", ""]
    out += ["### Fidelity / control over the steps (means over units, each method at its own CFG)", "",
            "| method | " + " | ".join(f"{s}" for s in done) + " |", "|---|" + "---|" * len(done)]
    for row in summary["methods"].values():
        figs = [row["steps"].get(str(s)) or row["steps"]["0"] for s in done]
        out.append(f"| {row['label']} | " + " | ".join(
            f"{f['fidelity']['mean']:.2f} / {f['control']['mean']:.2f}" for f in figs) + " |")
    out.append("")
    for step in shown:
        out += [f"### At {step} steps (each method at its own CFG; mean over units [95 % interval])", "",
                "| method | CFG | fidelity | control | control: background | control: pattern | leak | "
                f"usable by {done[-1]} steps (units, median step) |", "|---|---|---|---|---|---|---|---|"]
        for m, row in summary["methods"].items():
            figs = row["steps"].get(str(step)) or row["steps"]["0"]
            usable = summary["usable"].get(m)
            reach = (f"{usable['reached']}/{usable['units']}, "
                     + (f"{usable['median_step']:g}" if usable["median_step"] is not None else "-")) if usable else "-"
            out.append(f"| {row['label']} | {row['cfg']:g} | " + " | ".join(
                _cell(figs[f]) for f in ("fidelity", "control", "control_background", "control_pattern", "leak"))
                + f" | {reach} |")
        out.append("")
    out += ["### Paired differences (method - reference, 95 % interval; * where it excludes zero)", "",
            "| difference | step | fidelity | control | leak |", "|---|---|---|---|---|"]
    for pair, by_step in summary["differences"].items():
        for step in map(str, shown):
            cells = [_cell(by_step[step][f]) + (" *" if Interval(**by_step[step][f]).excludes_zero else "")
                     for f in ("fidelity", "control", "leak")]
            out.append(f"| {pair} | {step} | " + " | ".join(cells) + " |")
    out += ["", f"### What the fidelity images keep at {done[-1] if done else '-'} steps (shares of the images, no "
            "intervals)", "", "| method | the reference's shape | its colour | the object in the reference's "
            "background colour |", "|---|---|---|---|"]
    for m, by_step in summary["parts"].items():
        if done and (kept := by_step[str(done[-1])]):
            out.append(f"| {summary['methods'][m]['label']} | " + " | ".join(f"{v:.2f}" for v in kept.values()) + " |")
    if plan.sweep_step in done:
        cfgs = sorted({GUIDANCE, *plan.sweep})
        out += ["", f"### CFG sweep at {plan.sweep_step} steps (the words row: the base model): fidelity / control",
                "", "| method | " + " | ".join(f"CFG {c:g}" for c in cfgs) + " |", "|---|" + "---|" * len(cfgs)]
        for m, by_cfg in summary["sweep"].items():
            cells = [f"{by_cfg[f'{c:g}']['fidelity']['mean']:.2f} / {by_cfg[f'{c:g}']['control']['mean']:.2f}"
                     for c in cfgs]
            out.append(f"| {summary['methods'][m]['label']} | " + " | ".join(cells) + " |")
    for where, spent in summary["seconds"].items():
        out.append(f"\nTime spent ({where}, summed over every resumed part): "
                   + ", ".join(f"{what} {seconds / 3600:.2f} h" for what, seconds in spent.items())
                   + f", {sum(spent.values()) / 3600:.2f} h in all.")
    return "\n".join(out) + "\n"


def plot(summary: dict, plan: Plan, path: Path) -> None:
    """Fidelity and control over steps with their intervals, one line per method; the ceiling as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, f in zip(axes, ("fidelity", "control")):
        for m, row in summary["methods"].items():
            if m == CEILING:
                ceiling = row["steps"]["0"][f]
                ax.axhspan(ceiling["low"], ceiling["high"], color="grey", alpha=0.15, label=row["label"])
                continue
            curve(ax, row, plan.checkpoints, f)
        ax.axhline(FIDELITY_OK if f == "fidelity" else CONTROL_OK, color="grey", linewidth=0.8, linestyle=":")
        if plan.sweep_step in plan.checkpoints:
            ax.axvline(plan.sweep_step, color="grey", linewidth=0.6, linestyle="--")
        ax.set(xscale="log", xlim=(plan.checkpoints[0] * 0.8, plan.checkpoints[-1] * 1.25), ylim=(0, 1.02),
               xlabel="training steps", ylabel=f,
               title=f"{f} (95 % intervals over concepts x seeds)")
    axes[0].legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


check_ranges = check_methods  # what --quick asserts


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
    parser.add_argument("--probes", action="store_true",
                      help="DreamArtist gamma 3 with one setting changed at a time, to 1500 steps (quality-probes.md)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for quality.json/.md/.png")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of the runs and the ledger, which a later call continues "
                             "(default OUT/quality-work)")
    mode.add_argument("--report", action="store_true", help="only write the tables and plot from the ledger so far")
    parser.add_argument("--hours", type=float, default=None, help="stop after the piece of work that passes this")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.probes and (args.quick or args.base):
        parser.error("--probes trains the probes of the full benchmark; it goes without --quick and --base")
    torch.set_num_threads(args.threads)
    if args.base:
        scores = base(samples=4)
        print(" ".join(f"{a} {scores[a]:.3f}" for a in (*ATTRIBUTES, "all")))
        return 0
    from dreamartist.toyworld import load_backend

    plan, trained = (PROBE_PLAN, PROBES) if args.probes else (QUICK if args.quick else FULL, METHODS)
    # probes are read beside the two reference rows, from the same ledger
    shown = {m: METHODS[m] for m in REFERENCE_METHODS} | PROBES if args.probes else METHODS
    stem, command = ("quality-probes", "python benchmarks/quality.py --probes") if args.probes else (
        "quality", "python benchmarks/quality.py")
    work = args.work or args.out / "quality-work"
    if args.report:
        done, ledger = False, Ledger(work / "ledger.jsonl")
        summary = summarize(list(ledger.records.values()), plan, shown)
        done = done_steps(summary, plan) == list(plan.checkpoints)
    else:
        with tempfile.TemporaryDirectory(prefix="dreamartist-quality-") as scratch:
            bench = Benchmark(plan, Path(scratch) if args.quick else work, trained,
                              backend=load_backend(device=args.device))
            started = time.monotonic()
            done = bench.run(args.hours)
            summary = summarize(list(bench.ledger.records.values()), plan, shown)
        print(f"{time.monotonic() - started:.0f} s in this process (training {bench.seconds['training']:.0f} s, "
              f"sampling {bench.seconds['sampling']:.0f} s); {'finished' if done else 'not finished'}")
    check_ranges(summary)
    print(tables(summary, plan, command))
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"plan": asdict(plan), "thresholds": {"fidelity": FIDELITY_OK, "control": CONTROL_OK},
                  "finished": done, "summary": summary}
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(tables(summary, plan, command))
        plot(summary, plan, args.out / f"{stem}.png")
        print(f"wrote {args.out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
