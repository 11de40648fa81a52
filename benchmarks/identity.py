"""Identity mode on the toy world: does it keep the identity and follow the rest of the prompt better?

    python benchmarks/identity.py              # the full benchmark, resumable: run it again to continue
    python benchmarks/identity.py --quick      # a one-minute version (CI): every figure comes out and lies in range
    python benchmarks/identity.py --report     # only the tables and plot from the ledger so far
    python benchmarks/identity.py --readings   # what the control prompts' samples show, attribute by attribute

The purple star, the green heart and the orange moon (dreamartist.toyworld.world.CONCEPT_REFERENCES) are the
identities: one render each, its object mask as the face region. Every row trains the same steps from the same render:

  textual inversion       the webui's TI defaults (1 vector, lr 0.005, no reconstruction); sampled at the base CFG
  DreamArtist             the product's defaults at gamma 3; sampled at gamma 3 with NAME-neg as the negative prompt
  identity mode           Beyond Inserting as shipped (5 stages x K/V, lambda 0.003 on the 32x32-class layers), class
                          word "circle" (a shape the model knows, as "person" is for faces), template "a photo of a
                          [name]"; sampled at the base CFG
  ... without the attention loss (lambda 0), with one K/V pair (S = 1), with the loss on the 16x16 layers
                          too (the paper does not say which layers; 32x32 is the default), and without the K/V split
  ... as one token        every ablation at once (one stage, no K/V split, no loss): a textual inversion whose token
                          the block writes; with and without the paper's augmentation

Scores, read by the shipped attribute classifier (dreamartist.toyworld.metrics.identity_scores), per image:

  identity  the reference's shape, in every prompt, and its colour, unless the prompt asks another
  control   the identity kept AND the asked value shown, for "on a blue background" (background), "on a striped
            background" (pattern) and "in blue" (the object's colour: the analogue of the paper's "eyes closed");
            per attribute, and their mean
  mass      the word's cross-attention at the 32x32-class layers inside the object's mask over all of it, for the
            identity rows and TI, before training and at each checkpoint (a uniform map gives the mask's area)

Means over units (concept x seed) with 95 % bootstrap intervals, and paired differences against DreamArtist and
against identity mode; a difference is claimed only where its interval excludes zero. The cost of a step is timed
side by side (identity mode / DreamArtist at the same size, median over interleaved steps).
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

from dreamartist import identityfiles, pairfiles  # noqa: E402
from dreamartist.attention_control import controlled  # noqa: E402
from dreamartist.config import IdentityConfig, TrainConfig  # noqa: E402
from dreamartist.gamma import parse_gamma  # noqa: E402
from dreamartist.identity_control import IdentityControl  # noqa: E402
from dreamartist.identity_training import IdentityTrainer  # noqa: E402
from dreamartist.images import prepare_reference  # noqa: E402
from dreamartist.names import negative_name  # noqa: E402
from dreamartist.sampling import StagedConditioning, sample_rows, to_images  # noqa: E402
from dreamartist.toyworld.evaluate import GUIDANCE, unit_noise  # noqa: E402
from dreamartist.toyworld.intervals import Interval, bootstrap, paired  # noqa: E402
from dreamartist.toyworld.ledger import Ledger  # noqa: E402
from dreamartist.toyworld.metrics import identity_scores, share, shows  # noqa: E402
from dreamartist.toyworld.render import coverage, layout, render  # noqa: E402
from dreamartist.toyworld.reporting import Bench, Run, check_interval, check_methods, curve  # noqa: E402
from dreamartist.toyworld.world import CONCEPT_REFERENCES, REFERENCE_SEED, Scene  # noqa: E402
from dreamartist.trainer import Trainer, train_together  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
EDITED = ("background", "pattern", "colour")
FIGURES = ("identity", "control", *(f"control_{a}" for a in EDITED))
SAVE_EVERY = 250
IDENTITY_BASE = {"class_word": "circle", "template": "a photo of a [name]"}
REFERENCE_ROWS = ("da", "id")  # every row is compared with these
# a free token against one the identity block writes, with and without the paper's augmentation
DIFFERENCE_PAIRS = (("ti", "id_token"), ("ti", "id_token_noaug"), ("id_token_noaug", "id_token"))
MASS_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass(frozen=True)
class Method:
    label: str
    mode: str  # "pair" or "identity"
    config: dict = field(default_factory=dict)
    cfg: float = GUIDANCE
    negative: bool = False  # NAME-neg as the negative prompt


METHODS: dict[str, Method] = {
    "ti": Method("textual inversion", "pair", {"gamma": "1", "reconstruction": False, "pos_len": 1, "neg_len": 1,
                                               "lr": 0.005}),
    "da": Method("DreamArtist gamma 3", "pair", {"gamma": "3"}, cfg=3.0, negative=True),
    "id": Method("identity mode", "identity"),
    "id_noattn": Method("identity mode, no attention loss", "identity", {"attention_weight": 0.0}),
    "id_onepair": Method("identity mode, one K/V pair", "identity", {"stages": 1}),
    "id_coarse": Method("identity mode, loss on 16x16 and 32x32", "identity", {"attention_layers": "16x16+32x32"}),
    "id_nosplit": Method("identity mode, no K/V split", "identity", {"kv_split": False}),
    # identity mode with every ablation at once: one token, as textual inversion has, written by the block
    "id_token": Method("identity mode as one token (one stage, no K/V split, no attention loss)", "identity",
                       {"stages": 1, "kv_split": False, "attention_weight": 0.0}),
    "id_token_noaug": Method("identity mode as one token, no augmentation", "identity",
                             {"stages": 1, "kv_split": False, "attention_weight": 0.0, "augment": False}),
}
MASS_ROWS = ("ti", "id", "id_noattn", "id_onepair", "id_coarse", "id_nosplit", "id_token")
MASS_PAIRS = (("id", "id_noattn"), ("id", "ti"))  # the attention loss's effect; identity mode against TI
IDENTITY_PROMPTS = ("a photo of a [name]", "a picture of a [name]")
EDIT_PROMPT = {"background": "a photo of a [name] on a {value} background",
               "pattern": "a photo of a [name] on a {value} background", "colour": "a photo of a [name] in {value}"}
EDIT_ORDER = {"background": ("blue", "red", "white", "yellow"), "pattern": ("striped", "checkered", "dotted"),
              "colour": ("blue", "red", "yellow", "white")}


@dataclass(frozen=True)
class Plan:
    concepts: tuple[Scene, ...] = CONCEPT_REFERENCES[:3]
    seeds: tuple[int, ...] = (0, 1, 2)
    checkpoints: tuple[int, ...] = (100, 250, 500, 1000)
    samples: int = 4
    values_per_attribute: int = 2
    sample_steps: int = 20
    chunk: int = 96
    cost_steps: int = 20  # interleaved steps of each method timed for the cost ratio


FULL = Plan()
QUICK = Plan(concepts=CONCEPT_REFERENCES[:1], seeds=(0,), checkpoints=(4,), samples=1, sample_steps=4, cost_steps=3)


def prompts(reference: Scene, name: str, per_attribute: int) -> list[dict]:
    out = [{"text": line.replace("[name]", name), "attribute": None, "value": None} for line in IDENTITY_PROMPTS]
    for attribute in EDITED:
        taken = {reference.value(attribute), reference.colour, reference.background}
        for value in [v for v in EDIT_ORDER[attribute] if v not in taken][:per_attribute]:
            out.append({"text": EDIT_PROMPT[attribute].format(value=value).replace("[name]", name),
                        "attribute": attribute, "value": value})
    return out


def figures(reference: Scene, read: torch.Tensor, scored: list[dict], samples: int) -> dict[str, float]:
    kept: list[bool] = []
    followed: dict[str, list[bool]] = {a: [] for a in EDITED}
    for i, prompt in enumerate(scored):
        scores = identity_scores(read[i * samples:(i + 1) * samples], reference, prompt["attribute"], prompt["value"])
        kept += scores["identity"]
        if prompt["attribute"]:
            followed[prompt["attribute"]] += scores["followed"]
    out = {"identity": share(kept)} | {f"control_{a}": share(followed[a]) for a in EDITED}
    out["control"] = statistics.fmean(out[f"control_{a}"] for a in EDITED)
    return out


def object_mask(reference: Scene, side: int) -> torch.Tensor:
    """The reference render's object (its outline included) on a side x side grid, (side, side) bool."""
    cover = torch.from_numpy(coverage(reference.shape, layout(reference, REFERENCE_SEED))).float()
    return torch.nn.functional.adaptive_avg_pool2d(cover[None, None], side)[0, 0] > 0.5


class Benchmark(Bench):
    def __init__(self, plan: Plan, work: Path, methods: dict[str, Method] | None = None, backend=None,
                 classifier=None, log=print):
        super().__init__(plan, work, methods or METHODS, backend, classifier, log, prefix="toyid")

    def reference(self, run: Run):
        image = render(self.plan.concepts[run.concept], REFERENCE_SEED)
        return prepare_reference(image, 64, 64, vae_scale=self.backend.vae_scale)

    def config(self, run: Run, steps: int, resume: bool):
        method = self.methods[run.method]
        common = dict(name=self.names[run], steps=steps, width=64, height=64, seed=run.seed, save_every=SAVE_EVERY,
                      resume=resume, overwrite=not resume)
        if method.mode == "identity":
            return IdentityConfig(**common, **IDENTITY_BASE, **method.config)
        return TrainConfig(**common, **method.config)

    def saved_step(self, run: Run) -> int:
        try:
            if self.methods[run.method].mode == "identity":
                return identityfiles.load_identity(identityfiles.path_of(self.folder(run), self.names[run])).step
            return int(pairfiles.load_pair(self.folder(run), self.names[run])[0].step or 0)
        except Exception:  # noqa: BLE001 - nothing saved yet
            return 0

    def train_to(self, checkpoint: int, runs: list[Run]) -> None:
        pairs = []
        for run in runs:
            step = self.saved_step(run)
            if step >= checkpoint:
                continue
            config = self.config(run, checkpoint, resume=step > 0)
            if self.methods[run.method].mode == "identity":
                IdentityTrainer(self.backend, config, [self.reference(run)], self.folder(run)).run()
            else:
                pairs.append(Trainer(self.backend, config, [self.reference(run)], self.folder(run)))
        if pairs:
            train_together(pairs)

    def conditioning(self, run: Run) -> tuple[dict, dict, str]:
        """The run's words, identities and negative prompt, as saved."""
        name = self.names[run]
        if self.methods[run.method].mode == "identity":
            saved = identityfiles.load_identity(identityfiles.path_of(self.folder(run), name))
            return {name: saved.tokens.vectors(0, 0)}, {name: saved.tokens}, ""
        pos, neg = pairfiles.load_pair(self.folder(run), name)
        negative = negative_name(name) if self.methods[run.method].negative else ""
        return {name: pos.vectors, negative_name(name): neg.vectors}, {}, negative

    def score(self, jobs: list[tuple[str, Run]]) -> None:
        plan, shape = self.plan, (self.backend.latent_channels, 16, 16)
        images, words, identities = [], {}, {}
        for _, run in jobs:
            mine, staged, negative = self.conditioning(run)
            words |= mine
            identities |= staged
            cfg = self.methods[run.method].cfg
            for p, prompt in enumerate(prompts(plan.concepts[run.concept], self.names[run], plan.values_per_attribute)):
                noise = unit_noise(run.unit, p, plan.samples, shape)
                images += [(prompt["text"], negative, cfg, noise[s]) for s in range(plan.samples)]
        reads = []
        for start in range(0, len(images), plan.chunk):
            chunk = images[start:start + plan.chunk]
            pixels = sample_rows(self.backend, [c[0] for c in chunk], [c[1] for c in chunk], words,
                                 [parse_gamma(str(c[2])) for c in chunk], torch.stack([c[3] for c in chunk]),
                                 plan.sample_steps, identities=identities)
            reads.append(self.classifier.predict(to_images(pixels)))
        read, offset = torch.cat(reads), 0
        for key, run in jobs:
            reference = plan.concepts[run.concept]
            scored = prompts(reference, "x", plan.values_per_attribute)
            count = len(scored) * plan.samples
            self.ledger.add(key, {"run": asdict(run), **figures(reference, read[offset:offset + count], scored,
                                                                  plan.samples)})
            offset += count

    # -- the attention mass inside the object -----------------------------------------------------------------
    def mass(self, run: Run, words: dict, identities: dict) -> float:
        """The share of the word's cross-attention (the 32x32-class layers, averaged over MASS_TIMESTEPS) that falls
        inside the object's mask, with the reference render noised to each timestep."""
        backend, name = self.backend, self.names[run]
        prompt = f"a photo of a {name}"
        column = len(backend.token_ids("a photo of a")) + 1  # after the start token
        control = IdentityControl(levels=frozenset({1}))
        with torch.no_grad():
            latents = backend.vae_encode(self.reference(run).pixels.unsqueeze(0).to(backend.device))
        generator = torch.Generator().manual_seed(run.seed)
        shares = []
        staged = StagedConditioning(backend, [prompt], words, (), identities) if identities else None
        with torch.no_grad(), controlled(backend, control):
            for t in MASS_TIMESTEPS:
                abar = backend.alphas_cumprod[t].to(backend.device)
                noise = torch.randn(latents.shape, generator=generator).to(backend.device)
                z = abar.sqrt() * latents + (1 - abar).sqrt() * noise
                cond, values = staged.at(t) if staged else (backend.encode([prompt], words), None)
                with control.call(values=values, column=column):
                    backend.unet(z, torch.full((1,), t, device=backend.device), cond)
                for maps in control.take_maps():
                    side = int(round(maps.shape[-1] ** 0.5))
                    inside = object_mask(self.plan.concepts[run.concept], side).reshape(-1).to(maps.device)
                    shares.append(float(maps[0, inside].sum() / maps[0].sum()))
        return statistics.fmean(shares)

    def mass_at(self, run: Run, step: int) -> None:
        key = f"mass:{run.key}@{step}"
        if key in self.ledger:
            return
        if step == 0:
            words, identities = self.initial_conditioning(run)
        else:
            words, identities, _ = self.conditioning(run)
        self.ledger.add(key, {"run": asdict(run), "mass": self.mass(run, words, identities)})

    def initial_conditioning(self, run: Run) -> tuple[dict, dict]:
        """What the run starts from: TI's init vector, or the identity module's first tokens."""
        name = self.names[run]
        if self.methods[run.method].mode == "identity":
            with tempfile.TemporaryDirectory() as scratch:
                trainer = IdentityTrainer(self.backend, self.config(run, 1, False), [self.reference(run)],
                                          Path(scratch))
                trainer._start()
                tokens = trainer.tokens()
            return {name: tokens.vectors(0, 0)}, {name: tokens}
        with tempfile.TemporaryDirectory() as scratch:
            trainer = Trainer(self.backend, self.config(run, 1, False), [self.reference(run)], Path(scratch))
            trainer._start()
            return {name: {k: v.detach() for k, v in trainer.params["pos_words"].items()}}, {}

    # -- cost ----------------------------------------------------------------------------------------------
    def cost(self) -> None:
        if "cost" in self.ledger:
            return
        run_da, run_id = Run("da", 0, 0), Run("id", 0, 0)
        times: dict[str, list[float]] = {"da": [], "id": []}
        with tempfile.TemporaryDirectory() as scratch:
            import contextlib

            trainers = {"da": Trainer(self.backend, self.config(run_da, 10**4, False), [self.reference(run_da)],
                                      Path(scratch) / "da"),
                        "id": IdentityTrainer(self.backend, self.config(run_id, 10**4, False),
                                              [self.reference(run_id)], Path(scratch) / "id")}
            with contextlib.ExitStack() as stack:
                for trainer in trainers.values():
                    trainer.open(stack)
                for i in range(self.plan.cost_steps + 2):
                    for what, trainer in trainers.items():
                        started = time.perf_counter()
                        trainer._optimizer_step()
                        if i >= 2:  # the first steps warm the caches
                            times[what].append(time.perf_counter() - started)
        da, ident = statistics.median(times["da"]), statistics.median(times["id"])
        self.ledger.add("cost", {"da_seconds": da, "id_seconds": ident, "ratio": ident / da,
                                 "threads": torch.get_num_threads(), "device": str(self.backend.device)})

    def run(self) -> None:
        for run in self.runs:
            if run.method in MASS_ROWS:
                self.mass_at(run, 0)
        for checkpoint in self.plan.checkpoints:
            jobs = [(f"{run.key}@{checkpoint}", run) for run in self.runs
                    if f"{run.key}@{checkpoint}" not in self.ledger]
            if jobs:
                started = time.monotonic()
                self.train_to(checkpoint, [run for _, run in jobs])
                self.score(jobs)
                self.log(f"checkpoint {checkpoint}: {time.monotonic() - started:.0f} s")
            for run in self.runs:
                if run.method in MASS_ROWS:
                    self.mass_at(run, checkpoint)
        self.cost()


# -- what the control prompts' samples show -------------------------------------------------------------------
READINGS_PLAN = replace(FULL, seeds=(0,), checkpoints=(1000,), samples=16)
READING_METHODS = ("ti", "da", "id")


def tally(read: torch.Tensor, attribute: str, value: str) -> float:
    return share(shows(read, attribute, value).tolist())


def readings(bench: Benchmark) -> str:
    """For each control prompt, the share of samples whose object takes the asked colour, whose background takes it,
    and which show the asked pattern: identity mode, TI and DreamArtist trained to READINGS_PLAN's checkpoint (one
    seed per concept), and the base model given the concept's shape with and without its colour word."""
    plan, backend, shape = bench.plan, bench.backend, (bench.backend.latent_channels, 16, 16)
    bench.train_to(plan.checkpoints[-1], bench.runs)
    rows = []
    for c, reference in enumerate(plan.concepts):
        own = {"base, shape word": reference.shape, "base, colour and shape": f"{reference.colour} {reference.shape}"}
        sources = [(bench.methods[r.method].label, r) for r in bench.runs if r.concept == c] + list(own.items())
        for label, source in sources:
            run = source if isinstance(source, Run) else None
            words, identities, negative = bench.conditioning(run) if run else ({}, {}, "")
            name = bench.names[run] if run else source
            cfg = bench.methods[run.method].cfg if run else GUIDANCE
            for p, prompt in enumerate(prompts(reference, name, plan.values_per_attribute)):
                if prompt["attribute"] not in ("background", "pattern"):
                    continue
                noise = unit_noise((c, plan.seeds[0]), p, plan.samples, shape)
                pixels = sample_rows(backend, [prompt["text"]] * plan.samples, [negative] * plan.samples, words,
                                     [parse_gamma(str(cfg))] * plan.samples, noise, plan.sample_steps,
                                     identities=identities or None)
                read = bench.classifier.predict(to_images(pixels))
                asked = prompt["value"]
                figures = ((tally(read, "colour", asked), tally(read, "background", asked))
                           if prompt["attribute"] == "background" else (float("nan"), float("nan")))
                rows.append((reference.shape, label, prompt["attribute"], asked, *figures,
                             tally(read, "pattern", asked) if prompt["attribute"] == "pattern" else float("nan"),
                             tally(read, "shape", reference.shape)))
    lines = [f"### What the control prompts' samples show ({plan.samples} samples per prompt, "
             f"{plan.checkpoints[-1]} steps, seed {plan.seeds[0]})", "",
             "| concept | source | asked | object in the asked colour | background in it | asked pattern shown | "
             "the concept's shape |", "|---|---|---|---|---|---|---|"]
    for concept, label, attribute, asked, on_object, on_background, pattern, kept in rows:
        cells = [f"{x:.2f}" if x == x else "" for x in (on_object, on_background, pattern, kept)]
        lines.append(f"| {concept} | {label} | {attribute} {asked} | " + " | ".join(cells) + " |")
    lines += ["", "Means over the concepts and asked values (one seed each: no difference is claimed from these)", "",
              "| source | object in the asked colour | background in it | asked pattern shown | the concept's shape |",
              "|---|---|---|---|---|"]
    for label in dict.fromkeys(row[1] for row in rows):
        mine = [row[4:] for row in rows if row[1] == label]
        means = [statistics.fmean(x[i] for x in mine if x[i] == x[i]) for i in range(4)]
        lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in means) + " |")
    return "\n".join(lines) + "\n"


# -- the summary ---------------------------------------------------------------------------------------------
def per_unit(records: dict, method: str, step: int, figure: str, units: list, prefix: str = "") -> list[float]:
    return [float(records.get(f"{prefix}{method}-c{c}-s{s}@{step}", {}).get(figure, float("nan"))) for c, s in units]


def summarize(records: dict, plan: Plan, methods: dict[str, Method]) -> dict:
    units = [(c, s) for c in range(len(plan.concepts)) for s in plan.seeds]
    summary: dict = {"methods": {}, "differences": {}, "mass": {}, "cost": records.get("cost")}
    for m, method in methods.items():
        summary["methods"][m] = {"label": method.label, "cfg": method.cfg, "steps": {
            str(step): {f: asdict(bootstrap(per_unit(records, m, step, f, units))) for f in FIGURES}
            for step in plan.checkpoints}}
    pairs = [(m, base) for base in REFERENCE_ROWS for m in methods if m != base] + list(DIFFERENCE_PAIRS)
    for m, base in pairs:
        if base in methods and m in methods and f"{base}-{m}" not in summary["differences"]:
            summary["differences"][f"{m}-{base}"] = {str(step): {
                f: asdict(paired(per_unit(records, m, step, f, units), per_unit(records, base, step, f, units)))
                for f in FIGURES} for step in plan.checkpoints}
    for m in MASS_ROWS:
        if m in methods:
            summary["mass"][m] = {str(step): asdict(bootstrap(per_unit(records, m, step, "mass", units, "mass:")))
                                  for step in (0, *plan.checkpoints)}
    summary["mass_differences"] = {
        f"{a}-{b}": {str(step): asdict(paired(per_unit(records, a, step, "mass", units, "mass:"),
                                              per_unit(records, b, step, "mass", units, "mass:")))
                     for step in (0, *plan.checkpoints)}
        for a, b in MASS_PAIRS if a in methods and b in methods}
    area = [float(object_mask(plan.concepts[c], 8).float().mean()) for c, _ in units]
    summary["mask_area"] = statistics.fmean(area)
    return summary


def _cell(interval: dict) -> str:
    return str(Interval(**interval))


def tables(summary: dict, plan: Plan) -> str:
    last = str(plan.checkpoints[-1])
    out = ["### Identity / control over the steps (means over units, each row at its own CFG)", "",
           "| method | " + " | ".join(map(str, plan.checkpoints)) + " |", "|---|" + "---|" * len(plan.checkpoints)]
    for row in summary["methods"].values():
        out.append(f"| {row['label']} | " + " | ".join(
            f"{row['steps'][str(s)]['identity']['mean']:.2f} / {row['steps'][str(s)]['control']['mean']:.2f}"
            for s in plan.checkpoints) + " |")
    out += ["", f"### At {last} steps (mean over units [95 % interval])", "",
            "| method | CFG | identity | control | background | pattern | colour |", "|---|---|---|---|---|---|---|"]
    for row in summary["methods"].values():
        figs = row["steps"][last]
        out.append(f"| {row['label']} | {row['cfg']:g} | " + " | ".join(
            _cell(figs[f]) for f in FIGURES) + " |")
    out += ["", "### Paired differences (row - reference; * where the 95 % interval excludes zero)", "",
            "| difference | step | identity | control | background | pattern | colour |", "|" + "---|" * 7]
    for pair, by_step in summary["differences"].items():
        cells = [_cell(by_step[last][f]) + (" *" if Interval(**by_step[last][f]).excludes_zero else "")
                 for f in FIGURES]
        out.append(f"| {pair} | {last} | " + " | ".join(cells) + " |")
    steps = ("0", *map(str, plan.checkpoints))
    out += ["", "### The word's cross-attention mass inside the object (32x32-class layers; "
            f"a uniform map: {summary['mask_area']:.2f})", "",
            "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for m, by_step in summary["mass"].items():
        out.append(f"| {summary['methods'][m]['label']} | " + " | ".join(_cell(by_step[s]) for s in steps) + " |")
    for pair, by_step in summary["mass_differences"].items():
        out.append(f"| difference {pair} | " + " | ".join(
            _cell(by_step[s]) + (" *" if Interval(**by_step[s]).excludes_zero else "") for s in steps) + " |")
    if summary["cost"]:
        c = summary["cost"]
        out += ["", f"Cost of a training step, side by side ({c['device']}, {c['threads']} thread(s), 64 px): "
                f"identity mode {c['id_seconds'] * 1000:.0f} ms / DreamArtist {c['da_seconds'] * 1000:.0f} ms = "
                f"{c['ratio']:.2f}."]
    return "\n".join(out) + "\n"


def plot(summary: dict, plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, f in zip(axes, ("identity", "control")):
        for row in summary["methods"].values():
            curve(ax, row, plan.checkpoints, f)
        ax.set(xscale="log", ylim=(0, 1.02), xlabel="training steps", ylabel=f,
               title=f"{f} (95 % intervals over concepts x seeds)")
    axes[1].legend(loc="upper right", fontsize=7)  # control stays low: the upper half is free
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def check_ranges(summary: dict) -> None:
    check_methods(summary)
    for m, by_step in summary["mass"].items():
        for step, interval in by_step.items():
            check_interval(interval, f"mass of {m} at {step}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one concept, one seed, a few steps (CI)")
    mode.add_argument("--report", action="store_true", help="only write the tables and plot from the ledger so far")
    mode.add_argument("--readings", action="store_true",
                      help="TI, DreamArtist and identity mode trained on one seed per concept: what each control "
                           "prompt's samples show (identity-readings.md)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for identity.json/.md/.png")
    parser.add_argument("--work", type=Path, default=None, help="folder of the runs and the ledger (default "
                                                                "OUT/identity-work)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    work = args.work or args.out / "identity-work"
    if args.readings:
        from dreamartist.toyworld import load_backend

        with tempfile.TemporaryDirectory(prefix="dreamartist-identity-readings-") as scratch:
            bench = Benchmark(READINGS_PLAN, Path(scratch), {m: METHODS[m] for m in READING_METHODS},
                              backend=load_backend(device=args.device))
            text = readings(bench)
        print(text)
        (args.out / "identity-readings.md").write_text(text)
        return 0
    if args.report:
        records = Ledger(work / "ledger.jsonl").records
    else:
        from dreamartist.toyworld import load_backend

        with tempfile.TemporaryDirectory(prefix="dreamartist-identity-") as scratch:
            bench = Benchmark(plan, Path(scratch) if args.quick else work, backend=load_backend(device=args.device))
            started = time.monotonic()
            bench.run()
            records = bench.ledger.records
        print(f"{time.monotonic() - started:.0f} s in this process")
    summary = summarize(records, plan, METHODS)
    check_ranges(summary)
    print(tables(summary, plan))
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "identity.json").write_text(json.dumps({"plan": asdict(plan), "summary": summary}, indent=1)
                                                + "\n")
        (args.out / "identity.md").write_text(tables(summary, plan))
        plot(summary, plan, args.out / "identity.png")
        print(f"wrote {args.out / 'identity.json'}, identity.md, identity.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
