"""Real-image editing on the toy world: BARET against img2img, DDIM inversion and null-text inversion, with intervals.

    python benchmarks/editing.py                # the full plan, resumable: run it again to continue
    python benchmarks/editing.py --hours 1.5    # stop after the case that passes 1.5 hours; continue later
    python benchmarks/editing.py --quick        # a one-minute version (CI); writes into a temporary folder
    python benchmarks/editing.py --report       # only the tables, plots and example strip from the ledger so far
    python benchmarks/editing.py --cost         # the cost measured again (after a change to the edit's cost)

Cases: renders of scene combinations held out from pretraining (dreamartist.toyworld.world.held_out_scenes; the
classifier is the judge and has seen every scene), one fixed render seed each, each render edited in one attribute at
a time: colour, background, pattern and shape (the non-rigid edit). The target value is drawn per case from the
values the scene can take; the target text is the target scene's canonical caption ("a yellow heart on a blue
background, striped"), as a user names the picture they want. Every row edits the same 64x64 render through the
toy model at its own CFG (4) with the toy model's DDIM step count (20) unless --steps says otherwise:

  input, unedited          the render through the VAE and back: a floor for success, the ceiling of preservation
  ideal edit               the renderer's own edited picture (same position, size, tilt and pattern phase), through
                           the VAE: what a perfect editor could show through this VAE
  target text only         a fresh sample of the target text (no image): the classifier alone cannot tell a new
                           picture from an edit; the pixel figures can
  img2img 0.5 / 0.75       SDEdit: the latents noised to the level of the last 50 % / 75 % of the DDIM steps,
                           then those steps with the target text (the webui's img2img at that denoising strength)
  DDIM inversion           DDIM inversion with the target text (w = 1, BARET's own first step), then sampling
                           with the target text: BARET without TTIS and without BAM
  null-text inversion      dreamartist.null_text with the *source's caption* (which BARET does not get), then
                           sampling with the target text and the tuned null text per step
  BARET                    dreamartist.baret with the paper's defaults (TTIS lr 1e-3) and, as a separate row, at
                           TTIS lr 1e-2 (what reconstructs on the toy model); each also without BAM
                           (tau_SA = tau_CA = 0) and rigid (alpha = 1), reusing the same inversion
  BARET readings           at the paper's lr, readings of what the paper leaves open or gives as a range
                           (READINGS: each injection alone, MasaCtrl's decoder layers, the ends of the tau and
                           alpha ranges, the DDIM inversion on the target text); tabled, not plotted

Scores per edited image, read by the shipped attribute classifier and measured against the renderer's pixels:

  success         the edited attribute reads as the target value
  preserved       the other three attributes read as the source's
  success & kept  both
  kept-region error  mean absolute difference (8-bit levels) between the output and the input render over the
                  pixels the edit must not touch, from the renderer's object masks: outside the object (the union
                  of the source's and the target's object, grown by a pixel) for colour and shape edits; inside the
                  object (shrunk by a pixel) for background and pattern edits
  ideal error     mean absolute difference over the whole image to the ideal edit

The run goes in passes (``passes``): every case with the references, the baselines and the BARET rows at the first
TTIS lr (the paper's), then every case again for each further lr, so that a run stopped by --hours has the main
comparison whole; the outputs are written after each pass. The full plan is 40 renders x 4 attributes = 160 cases.

A unit is one case (render and edited attribute). Tables give the mean over cases with a 95 % bootstrap interval
(dreamartist.toyworld.intervals), overall and per edited attribute, and paired differences of each BARET row
against every other row; a difference is claimed only where its interval excludes zero. The cost is measured side
by side in one process: a BARET edit and a cached re-edit (dreamartist.baret.InversionCache, other alpha and tau)
against one plain DDIM generation of the same size and step count (50 by default).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist import null_text  # noqa: E402
from dreamartist.baret import InversionCache, decode, edit, edit_latents, inversion_options, invert  # noqa: E402
from dreamartist.edit_config import EditConfig  # noqa: E402
from dreamartist.gamma import parse_gamma  # noqa: E402
from dreamartist.inversion import Inversion  # noqa: E402
from dreamartist.losses import guide  # noqa: E402
from dreamartist.sampling import ddim_step, ddim_timesteps, sample_rows, to_images  # noqa: E402
from dreamartist.toyworld.evaluate import GUIDANCE, SAMPLE_STEPS  # noqa: E402
from dreamartist.toyworld.intervals import Interval, bootstrap, paired  # noqa: E402
from dreamartist.toyworld.ledger import Ledger  # noqa: E402
from dreamartist.toyworld.render import SIZE, coverage, dilate, draw, layout, render_array  # noqa: E402
from dreamartist.toyworld.world import ATTRIBUTES, VALUES, Scene, caption, held_out_scenes  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
EDITED = ("colour", "background", "pattern", "shape")  # shape: the non-rigid edit
SCENE_SEED = 26  # which held-out scenes the plan takes, and each case's target value
RENDER_SEED = 2_600_000  # render i of the plan has seed RENDER_SEED + i (pretraining draws its seeds below 2**62
# at random: a clash is as likely as any other)
SHARES = ("success", "preserved", "joint")
ERRORS = ("region_error", "ideal_error")
FIGURES = SHARES + ERRORS
FIGURE_LABELS = {"success": "success", "preserved": "preserved", "joint": "success & kept",
                 "region_error": "kept-region error", "ideal_error": "ideal error"}
REFERENCE, BASELINE, BARET = "reference", "baseline", "baret"
READING = "reading"  # BARET under another reading of what the paper leaves open: tabled, left out of the plots
READING_BASE = "ddim"  # what a reading is compared with: BARET's edit branch without any injection
# What each BARET row changes in the paper's defaults; READINGS only at the paper's TTIS lr, with their labels
VARIANTS = {"baret": {}, "baret-nobam": {"tau_sa": 0.0, "tau_ca": 0.0}, "baret-rigid": {"rigid": True}}
READINGS = {
    "baret-nomap": ("no map injection (tau_CA 0)", {"tau_ca": 0.0}),
    "baret-nokv": ("no K/V injection (tau_SA 0)", {"tau_sa": 0.0}),
    "baret-decoder": ("K/V in the decoder only (MasaCtrl's layers)", {"sa_layers": "decoder"}),
    "baret-tausa0.1": ("tau_SA 0.1", {"tau_sa": 0.1}),
    "baret-tauca0.4": ("tau_CA 0.4", {"tau_ca": 0.4}),
    "baret-alpha0.6": ("alpha 0.6 -> 0.1", {"alpha_start": 0.6}),
    "baret-targetinv": ("DDIM inversion on the target text", {"inversion_prompt": "target"}),
}
VARIANTS |= {name: changes for name, (_, changes) in READINGS.items()}
MIN_UNITS = 10  # no difference is claimed over fewer paired cases, whatever its interval (--quick has two)


@dataclass(frozen=True)
class Plan:
    """How much to run: renders, edited attributes, DDIM steps, the TTIS learning rates (one set of BARET rows each),
    null-text inversion's inner steps, and the cost measurement's step count and repeats."""

    renders: int = 40
    attributes: tuple[str, ...] = EDITED
    steps: int = SAMPLE_STEPS
    cfg: float = GUIDANCE
    ttis_lrs: tuple[float, ...] = (1e-3, 1e-2)
    nti_iterations: int = null_text.ITERATIONS
    cost_steps: int = 50
    cost_repeats: int = 3
    readings: bool = True  # the READINGS rows

    @property
    def guidance(self) -> str:
        """The guidance in ledger keys where it is not the toy model's own, so that runs at another CFG never mix
        with these in one ledger."""
        return "" if self.cfg == GUIDANCE else f"@cfg{self.cfg:g}"

    @property
    def tag(self) -> str:
        """What a case's ledger key ends with."""
        return f"{self.steps}{self.guidance}"


FULL = Plan()
QUICK = Plan(renders=1, attributes=("colour", "shape"), steps=4, nti_iterations=2, cost_steps=4, cost_repeats=1,
             readings=False)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: str  # REFERENCE, BASELINE, BARET (a full BARET edit: its paired differences are tabled) or READING
    short: str  # for plots


def rows(plan: Plan) -> dict[str, Row]:
    out = [Row("input", "input, unedited (VAE round trip)", REFERENCE, "input (VAE)"),
           Row("ideal", "ideal edit, rendered (VAE round trip)", REFERENCE, "ideal edit (VAE)"),
           Row("text", "target text only (new sample)", REFERENCE, "text only"),
           Row("img2img-0.5", "img2img, denoising 0.5", BASELINE, "img2img 0.5"),
           Row("img2img-0.75", "img2img, denoising 0.75", BASELINE, "img2img 0.75"),
           Row("ddim", "DDIM inversion + target text", BASELINE, "DDIM inversion"),
           Row("nti", "null-text inversion (source caption) + target text", BASELINE, "null-text inv."),
           ]
    for lr in plan.ttis_lrs:
        out += [Row(f"baret@{lr:g}", f"BARET, TTIS lr {lr:g}", BARET, f"BARET {lr:g}"),
                Row(f"baret-nobam@{lr:g}", f"BARET lr {lr:g} without BAM", BASELINE, f"BARET {lr:g} no BAM"),
                Row(f"baret-rigid@{lr:g}", f"BARET lr {lr:g}, alpha = 1", BASELINE, f"BARET {lr:g} alpha 1")]
    if plan.readings:
        lr = plan.ttis_lrs[0]
        out += [Row(f"{name}@{lr:g}", f"BARET lr {lr:g}, {label}", READING, label)
                for name, (label, _) in READINGS.items()]
    return {row.key: row for row in out}


def passes(plan: Plan) -> list[tuple[str, ...]]:
    """The rows in the order the run does them: every case with the references, the baselines and the BARET rows of
    the first TTIS lr, then every case again for each further lr; a run stopped early has its main comparison."""
    table = list(rows(plan))
    later = [tuple(k for k in table if k.endswith(f"@{lr:g}")) for lr in plan.ttis_lrs[1:]]
    first = tuple(k for k in table if not any(k in group for group in later))
    return [first, *later]


# -- cases ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    render: int  # index of the render in the plan
    source: Scene
    seed: int  # render seed
    attribute: str
    target: Scene

    @property
    def key(self) -> str:
        return f"r{self.render:02d}-{self.attribute}"


def target_value(source: Scene, attribute: str, rng: random.Random) -> str:
    """A value of ``attribute`` other than the source's that makes a valid scene (object and background differ)."""
    clash = {"colour": source.background, "background": source.colour}.get(attribute)
    return rng.choice([v for v in VALUES[attribute] if v != source.value(attribute) and v != clash])


def cases(plan: Plan) -> list[Case]:
    """The plan's cases, render by render; the same renders and targets for any plan of at least as many renders."""
    rng = random.Random(SCENE_SEED)
    sources = rng.sample(held_out_scenes(), 40 if plan.renders <= 40 else plan.renders)[:plan.renders]
    out = []
    for i, source in enumerate(sources):
        for attribute in EDITED:  # every target is drawn, so that a plan's subset of attributes sees the same ones
            target = replace(source, **{attribute: target_value(source, attribute, rng)})
            if attribute in plan.attributes:
                out.append(Case(i, source, RENDER_SEED + i, attribute, target))
    return out


def source_array(case: Case) -> np.ndarray:
    return render_array(case.source, case.seed)


def ideal_array(case: Case) -> np.ndarray:
    """The render edited by the renderer itself: the target scene drawn in the source render's layout."""
    return draw(case.target, layout(case.source, case.seed))


def kept_region(case: Case) -> np.ndarray:
    """(64, 64) bool: the pixels an edit of ``case`` must leave as they are (see the module's docstring)."""
    where = layout(case.source, case.seed)

    def grow(mask: np.ndarray) -> np.ndarray:
        return dilate(mask.astype(np.float32)[..., None], 1)[..., 0] > 0

    source = coverage(case.source.shape, where)
    if case.attribute in ("colour", "shape"):
        return ~grow((source > 0) | (coverage(case.target.shape, where) > 0))
    return ~grow(source < 1)


# -- scores -----------------------------------------------------------------------------------------------------
def score(classifier, case: Case, image: Image.Image) -> dict:
    """The figures of one output image of ``case``, read by ``classifier`` and measured against the renders."""
    read = [int(v) for v in classifier.predict([image])[0]]
    index = {a: i for i, a in enumerate(ATTRIBUTES)}
    success = read[index[case.attribute]] == VALUES[case.attribute].index(case.target.value(case.attribute))
    kept = [read[index[a]] == VALUES[a].index(case.source.value(a)) for a in ATTRIBUTES if a != case.attribute]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    difference = np.abs(pixels - source_array(case).astype(np.float32)).mean(axis=2)
    return {"read": read, "success": float(success), "preserved": float(all(kept)),
            "joint": float(success and all(kept)), "kept_share": sum(kept) / len(kept),
            "region_error": float(difference[kept_region(case)].mean()),
            "ideal_error": float(np.abs(pixels - ideal_array(case).astype(np.float32)).mean())}


def to_pixels(array: np.ndarray) -> torch.Tensor:
    """(64, 64, 3) uint8 -> (1, 3, 64, 64) in [-1, 1]."""
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def noise_for(case: Case, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise a case's img2img and text rows start from: the same for every row, step count and run."""
    digest = hashlib.sha256(f"editing:{case.key}".encode()).digest()
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(int.from_bytes(digest[:7], "big")))


@torch.no_grad()
def img2img(backend, latents: torch.Tensor, text: str, strength: float, steps: int, cfg: float,
            noise: torch.Tensor) -> torch.Tensor:
    """SDEdit: ``latents`` noised to the level of the last round(strength * steps) DDIM steps, then those steps."""
    abar_all = backend.alphas_cumprod.to(backend.device, torch.float32)
    timesteps = ddim_timesteps(abar_all.shape[0], steps)
    timesteps = timesteps[len(timesteps) - max(1, round(strength * len(timesteps))):]
    abar = abar_all[timesteps[0]]
    x = abar.sqrt() * latents.to(backend.device) + (1 - abar).sqrt() * noise.to(backend.device)
    cond = backend.encode(["", text])
    gamma = torch.full((1,), cfg, device=backend.device)
    for i, t in enumerate(timesteps):
        out_uncond, out_cond = backend.unet(torch.cat([x, x]), torch.full((2,), t, device=backend.device),
                                            cond).chunk(2)
        abar_next = abar_all[timesteps[i + 1] if i + 1 < len(timesteps) else 0]
        x = ddim_step(backend.prediction_type, guide(out_uncond, out_cond, gamma), x, abar_all[t], abar_next)
    return x


def say(*parts) -> None:
    print(*parts, flush=True)  # a log file read while the run goes on


class Benchmark:
    """The plan's cases, the rows, the ledger of finished scores; ``run()`` does what is left."""

    def __init__(self, plan: Plan, work: Path, backend=None, classifier=None, log=say):
        from dreamartist.toyworld import load_backend, load_classifier

        self.plan, self.work, self.log = plan, Path(work), log
        self.backend = backend if backend is not None else load_backend(device="cpu")
        self.classifier = classifier if classifier is not None else load_classifier()
        self.ledger = Ledger(self.work / "ledger.jsonl")
        self.rows = rows(plan)
        self.cases = cases(plan)
        self._null: tuple[int, Inversion] | None = None  # one per render, shared by its edits
        self._null_seconds = 0.0

    def key(self, case: Case, row: str) -> str:
        return f"{case.key}@{row}@{self.plan.tag}"

    def image_path(self, case: Case, row: str) -> Path:
        return self.work / "images" / f"steps{self.plan.tag}" / case.key / f"{row}.png"

    def todo(self, case: Case) -> list[str]:
        return [row for row in self.rows if self.key(case, row) not in self.ledger]

    def config(self, case: Case, lr: float) -> EditConfig:
        return EditConfig(target=caption(case.target), steps=self.plan.steps, cfg=self.plan.cfg, ttis_lr=lr)

    def baret_config(self, case: Case, row: str) -> EditConfig:
        variant, lr = row.split("@")
        return self.config(case, float(lr)).replace(**VARIANTS[variant])

    def decode(self, latents: torch.Tensor) -> Image.Image:
        with torch.no_grad():
            return to_images(self.backend.vae_decode(latents))[0]

    def edit_case(self, case: Case, wanted: list[str]) -> None:
        """Run the ``wanted`` rows on ``case``; record each row's scores as it finishes."""
        backend, plan = self.backend, self.plan
        with torch.no_grad():
            latents = backend.vae_encode(to_pixels(source_array(case)).to(backend.device))
        text = caption(case.target)
        inversions: dict[tuple, tuple] = {}  # inversion_options -> (inversion, seconds): shared by BARET rows
        for row in wanted:
            started = time.monotonic()
            if row == "input":
                out = latents
            elif row == "ideal":
                with torch.no_grad():
                    out = backend.vae_encode(to_pixels(ideal_array(case)).to(backend.device))
            elif row == "text":
                noise = noise_for(case, latents.shape[1:])
                image = to_images(sample_rows(backend, [text], [""], None, [parse_gamma(str(plan.cfg))], noise,
                                              plan.steps))[0]
                out = None
            elif row.startswith("img2img-"):
                out = img2img(backend, latents, text, float(row.split("-")[1]), plan.steps, plan.cfg,
                              noise_for(case, latents.shape[1:]))
            elif row == "ddim":
                out = invert(backend, latents, self.config(case, 1e-3).replace(ttis_iterations=0)).reconstruction[-1:]
            elif row == "nti":
                if self._null is None or self._null[0] != case.render:
                    inverted = time.monotonic()
                    self._null = (case.render, null_text.invert(backend, latents, caption(case.source),
                                                                steps=plan.steps, cfg=plan.cfg,
                                                                iterations=plan.nti_iterations))
                    self._null_seconds = time.monotonic() - inverted
                started = time.monotonic()  # the shared inversion is counted in every edit's record apart
                out = null_text.sample(backend, self._null[1], text)
            else:
                config = self.baret_config(case, row)
                shared = inversion_options(config)
                if shared not in inversions:
                    inverted = time.monotonic()
                    inversions[shared] = (invert(backend, latents, config), time.monotonic() - inverted)
                started = time.monotonic()  # the shared inversion is counted in every edit's record apart
                inversion, inversion_seconds = inversions[shared]
                out = edit_latents(backend, inversion, config)[0]
            if out is not None:
                image = self.decode(out)
            seconds = time.monotonic() - started
            path = self.image_path(case, row)
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            record = {"case": {"render": case.render, "attribute": case.attribute, "seed": case.seed,
                               "source": caption(case.source), "target": text},
                      "row": row, "steps": plan.steps, "seconds": round(seconds, 2),
                      **score(self.classifier, case, image)}
            if row.startswith("baret"):  # ``inversion`` is the one this edit used
                record |= {"ttis_iterations": sum(inversion.iterations), "ttis_loss": inversion.losses[-1],
                           "inversion_seconds": round(inversion_seconds, 2)}
            elif row == "nti":
                record |= {"nti_iterations": sum(self._null[1].iterations), "nti_loss": self._null[1].losses[-1],
                           "inversion_seconds": round(self._null_seconds, 2)}
            self.ledger.add(self.key(case, row), record)

    def cost_key(self) -> str:
        return cost_prefix(self.plan) + ",".join(f"{lr:g}" for lr in self.plan.ttis_lrs)

    def cost(self) -> dict:
        """A BARET edit and a cached re-edit against one plain DDIM generation of the same size and steps, measured
        in turns (plain, edit, re-edit per repeat) so that what else the machine does weighs on all three alike."""
        backend, plan = self.backend, self.plan
        case = self.cases[0]
        pixels = to_pixels(source_array(case)).to(backend.device)
        noise = noise_for(case, (backend.latent_channels, SIZE // backend.vae_scale, SIZE // backend.vae_scale))
        text = caption(case.target)
        counts = {"forward": 0, "backward": 0}
        original = backend.unet

        def counting(latents, timesteps, cond):
            counts["forward"] += latents.shape[0]
            if torch.is_grad_enabled() and cond.context.requires_grad:
                counts["backward"] += latents.shape[0]
            return original(latents, timesteps, cond)

        def timed(work) -> dict:
            for key in counts:
                counts[key] = 0
            if backend.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            wall, cpu = time.perf_counter(), time.process_time()
            work()
            if backend.device.type == "cuda":
                torch.cuda.synchronize()
            out = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, **counts}
            if backend.device.type == "cuda":
                out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            return out

        def plain():
            to_images(sample_rows(backend, [text], [""], None, [parse_gamma(str(plan.cfg))], noise, plan.cost_steps))

        result: dict = {"steps": plan.cost_steps, "device": str(backend.device), "threads": torch.get_num_threads(),
                        "by_lr": {}}
        shadowed = backend.__dict__.get("unet")  # normally none: unet is the class's method
        backend.unet = counting
        try:
            for lr in plan.ttis_lrs:
                config = EditConfig(target=text, steps=plan.cost_steps, cfg=plan.cfg, ttis_lr=lr)
                runs = []
                for _ in range(plan.cost_repeats):
                    cache = InversionCache()

                    def edit_once(config=config, cache=cache):
                        latents = backend.vae_encode(pixels)
                        decode(backend, edit(backend, latents, config, cache=cache))

                    def reedit(config=config, cache=cache):
                        latents = backend.vae_encode(pixels)
                        result = edit(backend, latents, config.replace(alpha_start=0.7, tau_sa=0.4), cache=cache)
                        assert result.reused, "the re-edit did not find its inversion in the cache"
                        decode(backend, result)

                    runs.append({"plain": timed(plain), "edit": timed(edit_once), "reedit": timed(reedit)})
                summary = {}
                for what in ("edit", "reedit"):
                    for clock in ("wall", "cpu"):
                        summary[f"{what}_{clock}_ratio"] = statistics.median(r[what][clock] / r["plain"][clock]
                                                                             for r in runs)
                    # forward-equivalents: a backward through the UNet costs about two forwards (methods.md B 2.7)
                    summary[f"{what}_row_ratio"] = ((runs[0][what]["forward"] + 2 * runs[0][what]["backward"])
                                                    / runs[0]["plain"]["forward"])
                summary["runs"] = runs
                result["by_lr"][f"{lr:g}"] = summary
                self.log(f"cost at {plan.cost_steps} steps, TTIS lr {lr:g}: edit / plain "
                         f"{summary['edit_wall_ratio']:.2f} (wall), {summary['edit_cpu_ratio']:.2f} (CPU); "
                         "cached re-edit / plain "
                         f"{summary['reedit_wall_ratio']:.2f} (wall), {summary['reedit_cpu_ratio']:.2f} (CPU)")
        finally:
            if shadowed is None:
                del backend.unet
            else:
                backend.unet = shadowed
        return result

    def run(self, hours: float | None = None, after_pass=None) -> bool:
        """The cost measurement (once per ledger), then pass by pass (``passes``) the cases in order, calling
        ``after_pass()`` after each pass that did something; with ``hours``, stops after the first case that ends
        past that budget. True when everything is done."""
        started = time.monotonic()
        if self.cost_key() not in self.ledger:
            self.ledger.add(self.cost_key(), {"cost": self.cost()})
        for number, selected in enumerate(passes(self.plan)):
            did = False
            for index, case in enumerate(self.cases):
                wanted = [row for row in self.todo(case) if row in selected]
                if not wanted:
                    continue
                if hours is not None and time.monotonic() - started > hours * 3600:
                    self.log(f"stopped before case {case.key} of pass {number + 1}: the budget of {hours} h is "
                             "spent; run again to go on")
                    if did and after_pass is not None:
                        after_pass()
                    return False
                began = time.monotonic()
                self.edit_case(case, wanted)
                did = True
                self.log(f"pass {number + 1}, case {index + 1}/{len(self.cases)} {case.key} ({caption(case.source)} "
                         f"-> {caption(case.target)}): {time.monotonic() - began:.0f} s")
            if did and after_pass is not None:
                after_pass()
        return True


# -- the summary ------------------------------------------------------------------------------------------------
def cost_prefix(plan: Plan) -> str:
    """How the plan's cost records are keyed."""
    return f"cost{plan.guidance}@{plan.cost_steps}@"


def per_unit(records: dict, row: str, figure: str, units: list[Case], tag: str) -> list[float]:
    return [float(records[f"{u.key}@{row}@{tag}"][figure]) if f"{u.key}@{row}@{tag}" in records else math.nan
            for u in units]


def summarize(records: dict, plan: Plan) -> dict:
    """Means with intervals per row, figure and edited attribute; paired differences of each BARET row against every
    other row; the cases done; the seconds per row; the cost."""
    all_cases, table = cases(plan), rows(plan)
    done = [c for c in all_cases if all(f"{c.key}@{r}@{plan.tag}" in records for r in table)]
    groups = {"all": all_cases, **{a: [c for c in all_cases if c.attribute == a] for a in plan.attributes}}
    summary: dict = {"cases": len(all_cases), "done": len(done), "rows": {}, "differences": {}, "seconds": {}}
    for key, row in table.items():
        summary["rows"][key] = {"label": row.label, "kind": row.kind, **{
            group: {f: asdict(bootstrap(per_unit(records, key, f, units, plan.tag))) for f in FIGURES}
            for group, units in groups.items()}}
        spent = [r["seconds"] + r.get("inversion_seconds", 0.0) for k, r in records.items()
                 if k.endswith(f"@{key}@{plan.tag}")]
        summary["seconds"][key] = statistics.median(spent) if spent else None
    for key, row in table.items():
        if row.kind not in (BARET, READING):
            continue
        for other in table if row.kind == BARET else (READING_BASE,):  # a reading: against what BAM adds to
            if other == key:
                continue
            summary["differences"][f"{key}|{other}"] = {
                group: {f: asdict(paired(per_unit(records, key, f, units, plan.tag),
                                         per_unit(records, other, f, units, plan.tag))) for f in FIGURES}
                for group, units in groups.items()}
    summary["ttis"] = {}
    for key in (k for k, row in table.items() if row.kind == BARET):  # how far TTIS got, and its last step's error
        tuned = [records[f"{u.key}@{key}@{plan.tag}"] for u in all_cases if f"{u.key}@{key}@{plan.tag}" in records]
        if tuned:
            summary["ttis"][key] = {"iterations": statistics.median(r["ttis_iterations"] for r in tuned),
                                    "loss": statistics.median(r["ttis_loss"] for r in tuned), "cases": len(tuned)}
    costs = [r["cost"] for k, r in records.items() if k.startswith(cost_prefix(plan))]
    summary["cost"] = costs[-1] if costs else None
    return summary


def claimed(interval: Interval) -> bool:
    """A difference is claimed where its interval excludes zero over at least MIN_UNITS paired cases."""
    return interval.units >= MIN_UNITS and interval.excludes_zero


def _cell(interval: dict, star: bool = False) -> str:
    text = str(Interval(**interval))
    return text + (" *" if star and claimed(Interval(**interval)) else "")


def _error_cell(interval: dict, star: bool = False) -> str:
    if not interval["units"]:
        return "n/a"
    text = f"{interval['mean']:.1f} [{interval['low']:.1f}, {interval['high']:.1f}]"
    return text + (" *" if star and claimed(Interval(**interval)) else "")


def cell(figure: str, interval: dict, star: bool = False) -> str:
    return (_error_cell if figure in ERRORS else _cell)(interval, star)


def goal(summary: dict, baret: str, group: str = "all") -> list[str]:
    """Per other method row: whether ``baret`` beats it in success (interval above zero) with preservation not worse
    (neither the preserved share below nor the kept-region error above, beyond their intervals)."""
    out = []
    for key, row in summary["rows"].items():
        if row["kind"] in (REFERENCE, READING) or key == baret:
            continue
        d = {f: Interval(**summary["differences"][f"{baret}|{key}"][group][f]) for f in FIGURES}
        if not d["success"].units:
            continue
        better = claimed(d["success"]) and d["success"].low > 0
        worse = [what for what, bad in (("preserved share", d["preserved"].high < 0),
                                        ("kept-region error", d["region_error"].low > 0))
                 if bad and claimed(d["preserved"] if what.startswith("preserved") else d["region_error"])]
        if better and not worse:
            verdict = "met: more successful, preservation not worse"
        elif better:
            verdict = f"not met: more successful, but worse in {' and '.join(worse)}"
        elif claimed(d["success"]):
            verdict = "not met: less successful" + (f", and worse in {' and '.join(worse)}" if worse else "")
        else:
            verdict = f"not shown: no success difference claimed over {d['success'].units} cases" + (
                f"; worse in {' and '.join(worse)}" if worse else "")
        error = d["region_error"]
        out.append(f"{row['label']}: {verdict} (success {d['success']}, preserved {d['preserved']}, kept-region "
                   f"error {error.mean:+.1f} [{error.low:+.1f}, {error.high:+.1f}])")
    return out


def tables(summary: dict, plan: Plan) -> str:
    """Markdown: the figures per row, success and preservation per edited attribute, the paired differences, the
    goal read off the intervals, the cost."""
    out = []
    if summary["done"] < summary["cases"]:
        out += [f"**Partial**: {summary['done']} of {summary['cases']} cases have every row; each row's intervals are "
                "over the cases it has, paired differences over the cases both have. `python benchmarks/editing.py` "
                "goes on from there.", ""]
    units = summary["rows"]["input"]["all"]["success"]["units"]
    out += [f"### All edits ({units} cases: {plan.renders} held-out renders x {', '.join(plan.attributes)}; DDIM "
            f"{plan.steps} steps, CFG {plan.cfg:g}; mean [95 % interval over cases])", "",
            "| row | " + " | ".join(FIGURE_LABELS[f] for f in FIGURES) + " | median s / edit (inversion included) |",
            "|---|" + "---|" * (len(FIGURES) + 1)]
    for key, row in summary["rows"].items():
        seconds = summary["seconds"][key]
        out.append(f"| {row['label']} | " + " | ".join(cell(f, row["all"][f]) for f in FIGURES)
                   + (f" | {seconds:.1f} |" if seconds is not None else " | - |"))
    for figure in ("success", "preserved", "region_error"):
        out += ["", f"### {FIGURE_LABELS[figure]} by edited attribute", "",
                "| row | " + " | ".join(plan.attributes) + " |", "|---|" + "---|" * len(plan.attributes)]
        for row in summary["rows"].values():
            out.append(f"| {row['label']} | " + " | ".join(cell(figure, row[a][figure]) for a in plan.attributes)
                       + " |")
    labels = {key: row["label"] for key, row in summary["rows"].items()}
    for key, row in summary["rows"].items():
        if row["kind"] != BARET:
            continue
        out += ["", f"### Paired differences: {row['label']} - row (all cases; * where the interval excludes zero; "
                "errors: lower is better)", "", "| row | " + " | ".join(FIGURE_LABELS[f] for f in FIGURES)
                + " | success: shape edits | kept-region error: shape edits |", "|---|" + "---|" * (len(FIGURES) + 2)]
        for pair, groups in summary["differences"].items():
            if not pair.startswith(f"{key}|"):
                continue
            other = pair.split("|")[1]
            shape = groups.get("shape")
            extra = (f" | {cell('success', shape['success'], True)} | "
                     f"{cell('region_error', shape['region_error'], True)}" if shape else " | - | -")
            out.append(f"| {labels[other]} | " + " | ".join(cell(f, groups["all"][f], True) for f in FIGURES)
                       + extra + " |")
        out += ["", f"The goal (best success at equal or better preservation) for {row['label']}, row by row:", ""]
        out += [f"- {line}" for line in goal(summary, key)] or ["- no paired cases yet"]
        if "shape" in plan.attributes:
            out += ["", "Shape edits only:", ""]
            out += [f"- {line}" for line in goal(summary, key, "shape")] or ["- no paired cases yet"]
    readings = [key for key, row in summary["rows"].items() if row["kind"] == READING]
    if readings:
        base = labels[READING_BASE]
        out += ["", f"### BARET readings - {base} (paired, all cases; * where the interval excludes zero)", "",
                "| reading | success | preserved | kept-region error | success: shape edits |", "|---|---|---|---|---|"]
        for key in readings:
            groups = summary["differences"][f"{key}|{READING_BASE}"]
            shape = groups.get("shape")
            out.append(f"| {labels[key]} | " + " | ".join(cell(f, groups["all"][f], True) for f in
                                                         ("success", "preserved", "region_error"))
                       + f" | {cell('success', shape['success'], True) if shape else '-'} |")
    cost = summary.get("cost")
    if cost:
        out += ["", f"### Cost ({cost['device']}, {cost['threads']} thread(s); {cost['steps']} DDIM steps, 64x64; "
                "median over repeats measured in turns)", "",
                "| TTIS lr | BARET edit / plain generation (wall) | (CPU time) | (UNet row forward-equivalents) | "
                "cached re-edit / plain (wall) | (CPU time) | (UNet rows) | TTIS UNet calls with gradient |",
                "|---|---|---|---|---|---|---|---|"]
        for lr, c in cost["by_lr"].items():
            runs = c["runs"]
            backward = runs[0]["edit"]["backward"]
            out.append(f"| {lr} | {c['edit_wall_ratio']:.2f} | {c['edit_cpu_ratio']:.2f} | {c['edit_row_ratio']:.2f} | "
                       f"{c['reedit_wall_ratio']:.2f} | {c['reedit_cpu_ratio']:.2f} | {c['reedit_row_ratio']:.2f} | "
                       f"{backward} of {5 * cost['steps']} |")
            if "peak_mib" in runs[0]["edit"]:
                out.append(f"\nCUDA peak memory, lr {lr}: plain {runs[0]['plain']['peak_mib']:.0f} MiB, edit "
                           f"{runs[0]['edit']['peak_mib']:.0f} MiB, re-edit {runs[0]['reedit']['peak_mib']:.0f} MiB.")
    if summary.get("ttis"):
        paper = EditConfig(target="-")
        limit = paper.threshold_start + (plan.steps - 1) * paper.threshold_step
        out += ["", f"### TTIS's early stop (median over cases; the last step's limit is {limit:.2g})", "",
                "| row | Adam steps taken | the last step's latent error after them |", "|---|---|---|"]
        for key, ttis in summary["ttis"].items():
            out.append(f"| {summary['rows'][key]['label']} | {ttis['iterations']:g} of "
                       f"{paper.ttis_iterations * plan.steps} | {ttis['loss']:.2g} |")
    return "\n".join(out) + "\n"


def plot(summary: dict, plan: Plan, path: Path) -> None:
    """Success against kept-region error per row (95 % intervals both ways); success and preservation per edited
    attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(plan)
    colours = {key: plt.get_cmap("tab20")(i % 20) for i, key in enumerate(table)}
    figure, axes = plt.subplots(1, 3, figsize=(18, 5.2), dpi=100, gridspec_kw={"width_ratios": [1.1, 1, 1]})
    ax = axes[0]
    for key, row in summary["rows"].items():
        s, e = row["all"]["success"], row["all"]["region_error"]
        if not s["units"] or row["kind"] == READING:
            continue
        marker = {REFERENCE: "s", BASELINE: "o", BARET: "*"}[row["kind"]]
        ax.errorbar(s["mean"], e["mean"], xerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]],
                    yerr=[[e["mean"] - e["low"]], [e["high"] - e["mean"]]], fmt=marker,
                    markersize=12 if row["kind"] == BARET else 6, capsize=2, color=colours[key], label=table[key].short)
    ax.set(xlabel="edit success", ylabel="kept-region error (8-bit levels; lower keeps more)", xlim=(-0.03, 1.03),
           title=f"success vs preservation, {summary['done']} of {summary['cases']} cases (95 % intervals)")
    ax.legend(fontsize=7, loc="best")
    shown = [k for k, row in summary["rows"].items() if k not in ("input", "ideal") and row["kind"] != READING]
    width = 0.85 / len(shown)
    for ax, name in zip(axes[1:], ("success", "preserved")):
        for i, key in enumerate(shown):
            row = summary["rows"][key]
            xs = np.arange(len(plan.attributes)) + (i - len(shown) / 2 + 0.5) * width
            means = np.nan_to_num([row[a][name]["mean"] for a in plan.attributes])
            low = np.nan_to_num([row[a][name]["mean"] - row[a][name]["low"] for a in plan.attributes])
            high = np.nan_to_num([row[a][name]["high"] - row[a][name]["mean"] for a in plan.attributes])
            ax.bar(xs, means, width, yerr=[low, high], color=colours[key], label=table[key].short,
                   error_kw={"linewidth": 0.6}, hatch="//" if row["kind"] == BARET else None, edgecolor="white")
        ax.set(xticks=range(len(plan.attributes)), xticklabels=[f"{a} edits" for a in plan.attributes],
               ylim=(0, 1.05), ylabel=FIGURE_LABELS[name], title=f"{FIGURE_LABELS[name]} by edited attribute")
    axes[2].legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def example_strip(work: Path, plan: Plan, path: Path, render: int = 0) -> bool:
    """Render ``render``'s edits, one line per edited attribute: the input, the ideal edit and every row's output.
    False (nothing written) until every row of that render is done."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(plan)
    lines = [c for c in cases(plan) if c.render == render]
    shown = [k for k, row in table.items() if k not in ("input", "ideal") and row.kind != READING]
    folder = work / "images" / f"steps{plan.tag}"
    if not lines or not all((folder / c.key / f"{k}.png").exists() for c in lines for k in shown):
        return False
    columns = ["input (render)", "ideal edit (render)", *(table[k].short for k in shown)]
    figure, axes = plt.subplots(len(lines), len(columns), figsize=(1.25 * len(columns), 1.35 * len(lines) + 0.7),
                                dpi=120, squeeze=False)
    for line, case in zip(axes, lines):
        images = [source_array(case), ideal_array(case),
                  *(np.asarray(Image.open(folder / case.key / f"{k}.png").convert("RGB")) for k in shown)]
        for ax, image in zip(line, images):
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        line[0].set_ylabel(f"{case.attribute}\n-> {case.target.value(case.attribute)}", fontsize=8)
    for ax, title in zip(axes[0], columns):
        ax.set_title(title, fontsize=7)
    figure.suptitle(f"{caption(lines[0].source)}: one attribute edited per line; the target text is the edited "
                    f"scene's caption ({plan.steps} DDIM steps, CFG {plan.cfg:g})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def check_ranges(summary: dict) -> None:
    """Shares and their intervals lie in [0, 1], errors are >= 0, every interval holds its mean (--quick asserts)."""
    for key, row in summary["rows"].items():
        for group, figures in row.items():
            if not isinstance(figures, dict):
                continue
            for f, interval in figures.items():
                top = 1 if f in SHARES else math.inf
                if interval["units"] and not 0 <= interval["low"] <= interval["mean"] <= interval["high"] <= top:
                    raise AssertionError(f"{key} ({group}): {f} {interval} is not an interval in [0, {top}]")


def reading(summary: dict, plan: Plan) -> str:
    """What the tables can and cannot say, whatever the numbers."""
    return "\n".join([
        "### How to read this", "",
        "- Units are cases (one held-out render, one edited attribute); intervals are 95 % percentile bootstraps over "
        "cases, paired for differences. A difference is a claim only where its interval excludes zero (*).",
        "- The classifier reads four attributes and nothing else: a fresh sample of the target text (\"target text "
        "only\") can score success and preservation without keeping anything of the picture. The kept-region error "
        "and the ideal error are what tell an edit from a new picture.",
        "- The toy VAE blurs fine pattern detail (grid lines, dots): the input's own round trip is the floor of the "
        "kept-region error, and the ideal edit's round trip the floor of the ideal error.",
        "- Null-text inversion is given the source render's exact caption; every other row gets only the target "
        "text. DDIM inversion inverts on the empty text, as BARET's first step does by default.",
        "- BARET without BAM is DDIM inversion + target text by construction: the editing branch starts from the same "
        "z*_T with the same texts, and the tuned text (TTIS) reaches it only through the attention injections. The "
        "two rows agreeing is a check of the implementation; what BARET adds over DDIM inversion is BAM, and BAM is "
        "only as good as the reconstruction branch TTIS gives it (compare the TTIS lr rows).",
        "- The BARET readings (at the paper's lr) change one thing each that the paper leaves open or gives as a "
        "range; they are compared with DDIM inversion + target text, which is what every injection starts from.",
        "- The cost ratios count everything a user waits for (prompt encoding, VAE, inversion, TTIS, the branches' "
        "rows where something reads them, decoding). TTIS takes up to 5 Adam steps per DDIM step, each a UNet "
        "forward and backward; where its early stop never triggers it takes all of them, and the ratio is above the "
        "paper's ~6.5, which assumes about 100 of the 250.",
        f"- The toy model, not SD 1.5: {plan.steps} DDIM steps and CFG {plan.cfg:g}{whose_cfg(plan)}, 64x64 "
        "images. The paper's BARET defaults otherwise (TTIS at most 5 Adam steps per step, alpha 0.8 -> 0.1, "
        "tau_SA 0.3, tau_CA 0.6, all layers).",
    ]) + "\n"


def whose_cfg(plan: Plan) -> str:
    return {GUIDANCE: " (the toy model's own)", 7.5: " (the paper's)"}.get(plan.cfg, "")


def default_out(quick: bool) -> Path:
    """Where the outputs go without --out: benchmarks/results, or for --quick a fresh temporary folder (CI never
    writes into the results)."""
    return Path(tempfile.mkdtemp(prefix="dreamartist-editing-")) if quick else DEFAULT_OUT


def write(summary: dict, plan: Plan, out: Path, work: Path, finished: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"plan": asdict(plan), "rows": {k: asdict(r) for k, r in rows(plan).items()}, "finished": finished,
              "summary": summary}
    (out / "editing.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "editing.md").write_text(tables(summary, plan) + "\n" + reading(summary, plan))
    plot(summary, plan, out / "editing.png")
    strip = example_strip(work, plan, out / "editing-example.png")
    say(f"wrote {out / 'editing.json'}, editing.md, editing.png" + (", editing-example.png" if strip else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one render, two edits, 4 steps (CI)")
    mode.add_argument("--report", action="store_true", help="only write the tables and plots from the ledger so far")
    mode.add_argument("--cost", action="store_true", help="measure the cost again (the newest record is tabled), "
                                                          "then write the tables from the ledger")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for editing.json/.md/.png (default benchmarks/results; --quick: a temporary "
                             "folder)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of the ledger and the output images, which a later call continues "
                             "(default OUT/editing-work)")
    parser.add_argument("--hours", type=float, default=None, help="stop after the case that passes this")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps of every row (default: the toy model's "
                                                                 f"{FULL.steps}; --quick {QUICK.steps})")
    parser.add_argument("--ttis-lr", type=float, nargs="+", default=None,
                        help="TTIS learning rates, one set of BARET rows each (default "
                             f"{' '.join(map(str, FULL.ttis_lrs))}; the paper's is 1e-3)")
    parser.add_argument("--renders", type=int, default=None, help=f"held-out renders (default {FULL.renders})")
    parser.add_argument("--cfg", type=float, default=None,
                        help=f"guidance of every row (default: the toy model's {FULL.cfg:g}; the paper's is 7.5); "
                             "its cases are kept apart from the default's in the ledger")
    parser.add_argument("--cost-steps", type=int, default=None,
                        help=f"DDIM steps of the cost measurement (default {FULL.cost_steps})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    changes = {"steps": args.steps, "ttis_lrs": tuple(args.ttis_lr) if args.ttis_lr else None,
               "renders": args.renders, "cost_steps": args.cost_steps, "cfg": args.cfg}
    plan = replace(plan, **{k: v for k, v in changes.items() if v is not None})
    out = args.out or default_out(args.quick)
    work = args.work or (out / "editing-work")
    if args.report or args.cost:
        ledger = Ledger(work / "ledger.jsonl")
        if args.cost:
            from dreamartist.toyworld import load_backend

            bench = Benchmark(plan, work, backend=load_backend(device=args.device))
            ledger.add(bench.cost_key(), {"cost": bench.cost()})
        summary = summarize(ledger.records, plan)
        finished = summary["done"] == summary["cases"]
    else:
        from dreamartist.toyworld import load_backend

        bench = Benchmark(plan, work, backend=load_backend(device=args.device))

        def report_so_far() -> None:  # numbers exist after each pass, whenever the run is stopped
            so_far = summarize(bench.ledger.records, plan)
            check_ranges(so_far)
            write(so_far, plan, out, work, so_far["done"] == so_far["cases"])

        started = time.monotonic()
        finished = bench.run(args.hours, after_pass=None if args.quick else report_so_far)
        summary = summarize(bench.ledger.records, plan)
        say(f"{time.monotonic() - started:.0f} s in this process; {summary['done']} of {summary['cases']} cases "
            f"done; {'finished' if finished else 'not finished'}")
    check_ranges(summary)
    say(tables(summary, plan))
    write(summary, plan, out, work, finished)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
