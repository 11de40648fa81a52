"""The training loop, the same for every host and shaped for no method in particular.

It checks what can be checked before the first step, holds the pair's lock for the whole run, draws the data,
runs the optimiser over the objective's named groups (gradient accumulation, clipping, fp16 loss scaling, EMA),
guards against non-finite values, saves and resumes by group name, reports progress and stops on request. The
objective (``dreamartist.objective``) says what is trainable and computes the loss.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import fileops, pairfiles
from .backend import Backend
from .config import TrainConfig
from .errors import InputError, NameTaken, TrainingStopped
from .images import Reference
from .names import negative_name
from .objective import NEG, POS, DreamArtistObjective, Params, Part, joint_loss
from .sampling import grid, sample

PREVIEW_STEPS = 20
STATE_VERSION = 2
MIN_LOSS_SCALE = 2.0 ** -16  # below this every step has overflowed for a long while: nothing is learning


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    eta_seconds: float
    losses: list[float]
    preview: Image.Image | None = None


@dataclass
class TrainResult:
    files: list[Path]
    step: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    stopped: str = ""  # "" when all steps ran, "interrupted" when stopped early by the user
    preview: Image.Image | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know about the run (e.g. resume)


class _NonFinite(Exception):
    """What became non-finite, as the start of a sentence ("The loss became nan")."""


def _grad_scaler(device: torch.device):
    """Loss scaling for fp16 on CUDA (the webui's own textual-inversion trainer scales too); off elsewhere."""
    enabled = device.type == "cuda"
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3, as in webui 1.6-1.10


def _cpu_copy(params: Params) -> Params:
    return {g: {k: v.detach().float().cpu().clone() for k, v in group.items()} for g, group in params.items()}


def _detached(params: Params) -> Params:
    """The values themselves, for a resume state written before the next step (torch.save copies them out)."""
    return {g: {k: v.detach() for k, v in group.items()} for g, group in params.items()}


def _leaves(params: Params, device: torch.device) -> Params:
    """Leaf float32 copies on ``device`` that the optimiser owns."""
    return {g: {k: v.detach().to(device, torch.float32).clone().contiguous().requires_grad_(True)
                for k, v in group.items()} for g, group in params.items()}


def state_bytes_estimate(params: Params) -> int:
    """Bytes the pair files and resume state take on disk: each value as live, EMA, and two Adam moments."""
    return sum(v.numel() for group in params.values() for v in group.values()) * 4 * 5 + (64 << 10)


class Trainer:
    """One training run of the pair ``config.name`` into ``out_dir``; ``run()`` returns a TrainResult or raises
    a DreamArtistError whose message says what happened and where the last good pair is."""

    def __init__(self, backend: Backend, config: TrainConfig, references: list[Reference], out_dir: Path,
                 on_progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, existing_names: Iterable[str] = ()):
        self.backend, self.config, self.references = backend, config, list(references)
        self.out_dir = Path(out_dir)
        self.on_progress = on_progress or (lambda progress: None)
        self.should_stop = should_stop or (lambda: False)
        self.existing_names = {n.lower() for n in existing_names}
        self.objective = self.make_objective()
        self.width, self.height = config.size_for(backend.image_size)
        self.name = config.name
        self.step, self.losses, self.notes = 0, [], []
        self.saved_files: list[Path] = []
        self.saved_step = 0
        self._check_references()

    kind = "pair"  # what the run writes, in its messages

    def make_objective(self):
        return DreamArtistObjective(self.backend, self.config)

    # -- before the first step --------------------------------------------------------------------------
    def _check_references(self) -> None:
        if not self.references:
            raise InputError("No reference image was given.")
        for number, ref in enumerate(self.references, start=1):
            if ref.weight is not None and not bool(ref.weight.gt(0).any()):
                which = "The mask" if len(self.references) == 1 else f"The mask of reference {number}"
                raise InputError(f"{which} is black everywhere, so no pixel would be trained; paint the concept "
                                 "white or grey and leave black only what should not be learned.")

    def _check_output(self) -> None:
        """Names, clashes and the folder, checked under the pair's lock before any model work."""
        config = self.config
        if config.resume:
            return  # the pair must exist; _resume says so when it does not
        if not config.overwrite:
            for name in (self.name, negative_name(self.name)):
                if name.lower() in self.existing_names:
                    raise NameTaken(f"An embedding named {name!r} already exists; choose another name, "
                                     "or turn on Overwrite (or Resume to continue it).")
        pairfiles.check_can_save(self.out_dir, self.name, config.overwrite)

    # -- the parameters --------------------------------------------------------------------------------
    def _start(self) -> None:
        config = self.config
        self.seed = config.seed if config.seed >= 0 else int(torch.randint(0, 2**31 - 1, ()).item())
        self.generator = torch.Generator().manual_seed(self.seed)
        live, ema, state = self.objective.initial(self.generator), None, None
        if config.resume:
            live, ema, state = self._resume(live)
        fileops.check_writable(self.out_dir, state_bytes_estimate(live))
        device = self.backend.device
        self.params = _leaves(live, device)
        settings = self.objective.settings()
        self.ema = {g: {k: v.detach().clone() for k, v in self.params[g].items()} for g, s in settings.items()
                    if s.ema}
        for group, values in (ema or {}).items():
            if group in self.ema:  # an EMA kept by the saved run continues; one switched on now starts from live
                self.ema[group] = {k: v.to(device, torch.float32) for k, v in values.items()}
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.params[g].values()), "name": g, "lr": s.lr, "weight_decay": s.weight_decay}
             for g, s in settings.items()], betas=(config.beta1, config.beta2))
        self.scaler = _grad_scaler(device)
        if state is not None:
            self._load_optimizer(state)

    def _resume(self, fresh: Params) -> tuple[Params, Params | None, dict | None]:
        """The saved pair (and its adapters) as the run's starting point. A group this run adds starts fresh, a
        group it drops is left out; a group whose shapes changed (vector count, adapter rank) is refused."""
        state = pairfiles.load_state(self.out_dir, self.name)  # read once: an SDXL identity's is 2.5 GB
        saved, self.step = self.saved_values(state or {})
        self.saved_step = self.step
        if self.step >= self.config.steps:
            raise InputError(f"{self.name} has already been trained for {self.step} steps; ask for more than "
                             f"{self.step} steps to continue it.")
        ema = None
        if not state or state.get("version") != STATE_VERSION or state.get("step") != self.step:
            self.notes.append(f"No optimiser state matches step {self.step} of {self.name}: resuming from the "
                              "saved files with a fresh optimiser.")
            state = None
        else:
            saved |= {g: values["live"] for g, values in state["groups"].items()}  # the files may hold EMA values
            ema = {g: values["ema"] for g, values in state["groups"].items() if values.get("ema") is not None}
            self.losses = list(state.get("losses", []))
            self.generator.set_state(state["generator"])
            if self.config.seed >= 0 and self.config.seed != state.get("seed"):
                self.generator.manual_seed(self.config.seed + self.step)  # a new seed drives the rest of the run
                self.seed = self.config.seed
            else:
                self.seed = int(state.get("seed", self.seed))
        live = {}
        for group, tensors in fresh.items():
            if group not in saved:
                live[group] = tensors
                self.notes.append(f"{group} is new in this run and starts fresh.")
                continue
            self._check_shapes(group, saved[group], tensors)
            live[group] = saved[group]
        return live, ema, state

    def saved_values(self, state: dict) -> tuple[Params, int]:
        """The groups the saved files hold, and their step (``state``: the resume state, {} when there is none)."""
        pos_file, neg_file = resumable_pair(self.out_dir, self.name)
        for file in (pos_file, neg_file):
            pairfiles.check_compatible(file.vectors, self.backend.embedding_dims, file.path)
        adapters = pairfiles.load_adapters(self.out_dir, self.name) or {}
        return {POS: pos_file.vectors, NEG: neg_file.vectors, **adapters}, int(pos_file.step or 0)

    def _check_shapes(self, group: str, saved: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> None:
        if group in (POS, NEG):
            have, wanted = next(iter(saved.values())).shape[0], next(iter(fresh.values())).shape[0]
            if have != wanted:
                word = "S^p" if group == POS else "S^n"
                raise InputError(f"The saved {word} has {have} vectors, but Vectors in {word} is {wanted}; a resumed "
                                 f"pair keeps its length, so set it to {have}, or train a new pair.")
        elif {k: tuple(v.shape) for k, v in saved.items()} != {k: tuple(v.shape) for k, v in fresh.items()}:
            raise InputError(f"The saved adapters ({group}) have other layers or ranks than this run's; set the "
                             "adapter ranks as they were, or train a new pair.")

    def _load_optimizer(self, state: dict) -> None:
        """The saved moments, matched to the current groups by name (a new group starts without); this run's lr,
        betas and weight decay replace the saved ones, so options changed on resume take effect."""
        saved = state["optimizer"]
        by_name = {g["name"]: g for g in saved["param_groups"]}
        remapped = {"state": {}, "param_groups": []}
        index = 0
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            old = by_name.get(group["name"], {"params": []})
            ids = list(range(index, index + len(group["params"])))
            for old_id, new_id in zip(old["params"], ids):
                if old_id in saved["state"]:
                    remapped["state"][new_id] = saved["state"][old_id]
            remapped["param_groups"].append({**group, "params": ids})
            index += len(ids)
        self.optimizer.load_state_dict(remapped)
        for group, settings in zip(self.optimizer.param_groups, current, strict=True):
            group.update(settings)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # -- one optimiser step ----------------------------------------------------------------------------
    def part(self) -> Part:
        """This run's share of the next micro-batch: the references drawn and their latents."""
        picks = torch.randint(0, len(self.references), (self.config.batch_size,), generator=self.generator).tolist()
        refs = [self.references[i] for i in picks]
        latents = torch.cat([self.latents[i] for i in picks])  # (B,C,h,w)
        return Part(self.objective, self.params, refs, latents, self.generator)

    def _optimizer_step(self) -> float:
        """Accumulate ``grad_accum`` micro-batches, then one AdamW step; returns the mean loss."""
        return step_together([self])[0]

    def update(self) -> None:
        """The optimiser step on the accumulated gradients (unscaled, clipped), then the EMA."""
        tensors = [t for group in self.params.values() for t in group.values()]
        self.scaler.unscale_(self.optimizer)
        # One reduction over every gradient (a clip at infinity scales by exactly 1) and one device sync, not one
        # sync per tensor: with the adapters that was hundreds a step, each waiting for the GPU's queue to drain.
        norm = torch.nn.utils.clip_grad_norm_(tensors, self.config.grad_clip if self.config.grad_clip > 0 else math.inf)
        if not self.scaler.is_enabled() and not bool(torch.isfinite(norm)):
            raise _NonFinite("The gradients became infinite or NaN")
        self.scaler.step(self.optimizer)  # with fp16 loss scaling a step whose gradients overflowed is skipped
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled() and self.scaler.get_scale() < MIN_LOSS_SCALE:
            raise _NonFinite("The gradients overflowed at every loss scale")  # the scaler skipped every step
        with torch.no_grad():
            for group, ema in self.ema.items():
                decay = self.objective.settings()[group].ema
                averages, values = list(ema.values()), [self.params[group][k].detach() for k in ema]
                # the optimisers' own multi-tensor kernels: a launch per group, not two per tensor
                torch._foreach_mul_(averages, decay)
                torch._foreach_add_(averages, values, alpha=1 - decay)

    # -- outputs ---------------------------------------------------------------------------------------
    def _saved_params(self) -> Params:
        """What the files hold: the EMA values where EMA is on."""
        return {g: self.ema.get(g, group) for g, group in self.params.items()}

    def save(self) -> list[Path]:
        """Write the pair and its resume state as one commit; the files always hold a finished step."""
        live, ema = _detached(self.params), _detached(self.ema)
        state = {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "losses": list(self.losses),
                 "generator": self.generator.get_state(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "config": self.config.to_dict(),
                 "groups": {g: {"live": live[g], "ema": ema.get(g)} for g in live}}
        saved = _cpu_copy(self._saved_params())
        self.saved_files = pairfiles.save_pair(
            self.out_dir, self.name, saved[POS], saved[NEG], fmt=self.config.file_format, overwrite=True,
            step=self.step, total_steps=self.config.steps, gamma=str(self.objective.gamma),
            checkpoint_hash=self.backend.model_hash, checkpoint_name=self.backend.model_name, state=state,
            adapters={g: values for g, values in saved.items() if g not in (POS, NEG)})
        self.saved_step = self.step
        return self.saved_files

    def preview(self, on_step: Callable[[], None] | None = None) -> Image.Image:
        """Samples with the pair as it is saved (EMA values when on), at the training gamma (up to 4);
        ``on_step`` is called after each sampling step."""
        params = self._saved_params()
        words, patches = self.objective.words(params), self.objective.patches(params)
        images = []
        for i, (prompt, negative) in enumerate(self.objective.preview_prompts()):
            images += sample(self.backend, prompt, negative, words, guidance=self.objective.gamma,
                             steps=PREVIEW_STEPS, width=self.width, height=self.height,
                             seed=self.seed + i, on_step=on_step and (lambda i, n: on_step()), patches=patches)
        return grid(images)

    def _kept(self) -> str:
        """Where the last good pair is, in one sentence."""
        if not self.saved_files:
            return " Nothing was saved yet."
        names = " and ".join(f.name for f in self.saved_files)
        return f" The last good {self.kind} (step {self.saved_step}) is {names} in {self.out_dir}."

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with contextlib.ExitStack() as stack:
            self.open(stack)
            stopped, preview = self._loop()
        return self.result(stopped, preview)

    def check_resumable(self) -> None:
        resumable_pair(self.out_dir, self.name)

    def open(self, stack: contextlib.ExitStack) -> None:
        """Everything before the first step, kept open on ``stack``: the pair's lock, a finished save, the
        checks, the parameters, the model frozen for training and the references' latents."""
        if self.config.resume:
            self.check_resumable()  # before the lock, which would make the folder
        stack.enter_context(fileops.pair_lock(self.out_dir, self.name))
        fileops.recover(self.out_dir, self.name)
        self._check_output()
        self._start()
        stack.enter_context(self.backend.training(self.config.gradient_checkpointing))
        with torch.no_grad():
            self.latents = [self.backend.vae_encode(r.pixels.unsqueeze(0).to(self.backend.device))
                            for r in self.references]

    def result(self, stopped: str = "", preview: Image.Image | None = None) -> TrainResult:
        final = self.losses[-1] if self.losses else None
        return TrainResult(self.saved_files, self.step, final, list(self.losses), stopped, preview, self.notes)

    def after_step(self, loss: float, started: float, start_step: int) -> Image.Image | None:
        """Count the step, save and preview when due, report progress; returns the preview made, if any."""
        config = self.config
        self.step += 1
        self.losses.append(loss)
        if config.save_every and self.step % config.save_every == 0:
            self.save()
        preview = None
        if config.preview_every and self.step % config.preview_every == 0:
            preview = self.preview()
        rate = (time.monotonic() - started) / (self.step - start_step)
        self.on_progress(Progress(self.step, config.steps, loss, self.optimizer.param_groups[0]["lr"],
                                  rate * (config.steps - self.step), self.losses, preview))
        return preview

    def _loop(self) -> tuple[str, Image.Image | None]:
        config, start_step, started = self.config, self.step, time.monotonic()
        stopped, preview = "", None
        try:
            while self.step < config.steps:
                if self.should_stop():
                    stopped = "interrupted"
                    break
                preview = self.after_step(self._optimizer_step(), started, start_step)
        except _NonFinite as error:
            self._stop_with(f"{error.args[0]} at step {self.step + 1}",
                            "Try a lower learning rate or gamma.")
        except torch.cuda.OutOfMemoryError:
            self._stop_with(f"Out of GPU memory at step {self.step + 1}", "Try a smaller width/height, turn off "
                            "the reconstruction loss, or turn on gradient checkpointing.")
        except OSError as error:
            raise TrainingStopped(f"Saving failed at step {self.step} ({error.strerror or error}); training "
                                  f"stopped.{self._kept()}") from None
        if self.step > self.saved_step:
            self._save_or_stop()
        return stopped, preview

    def _save_or_stop(self) -> None:
        try:
            self.save()
        except OSError as error:
            why = error.strerror or error
            raise TrainingStopped(f"Saving the {self.kind} at step {self.step} failed ({why}).{self._kept()} Free some "
                                  "space or choose another folder, then resume.") from None

    def _stop_with(self, what: str, advice: str) -> None:
        """Keep the last good pair (the values before the failed step) and stop with a clear message."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.step > self.saved_step:
            self._save_or_stop()
        raise TrainingStopped(f"{what}; training stopped.{self._kept()} {advice}")


def resumable_pair(folder: Path, name: str) -> tuple[pairfiles.EmbeddingFile, pairfiles.EmbeddingFile]:
    """The saved pair a resumed run continues, or an InputError saying there is none."""
    try:
        return pairfiles.load_pair(folder, name)
    except InputError as e:  # one sentence: which file is missing matters less than what to do
        raise InputError(f"There is no pair {name} to resume in {folder} ({str(e).rstrip('.')}); turn off Resume "
                         "to train a new pair.") from None


def step_together(trainers: list[Trainer]) -> list[float]:
    """One optimiser step of every trainer, their micro-batches through one joint loss (one text-encoder and one
    UNet call, ``objective.joint_loss``); each trainer keeps its own optimiser, scaler and EMA. Returns each
    trainer's mean loss."""
    accum = trainers[0].config.grad_accum
    if any(t.config.grad_accum != accum for t in trainers):
        raise ValueError("runs stepped together need the same gradient accumulation")
    totals = [0.0] * len(trainers)
    for _ in range(accum):
        losses = joint_loss([t.part() for t in trainers])
        values = torch.stack([loss.detach().float() for loss in losses]).tolist()  # one device sync
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise _NonFinite(f"The loss became {value}")
            totals[i] += value / accum
        sum(t.scaler.scale(loss / accum) for t, loss in zip(trainers, losses)).backward()
    for t in trainers:
        t.update()
    return totals


def train_together(trainers: list[Trainer]) -> list[TrainResult]:
    """Several runs on one backend stepped in lockstep (``step_together``) until each has run its steps: the same
    pairs as each run alone, to float rounding, in far less time where one run's UNet call is small. Every run
    saves and reports as alone; a fault stops all of them with the exception as raised."""
    with contextlib.ExitStack() as stack:
        for t in trainers:
            t.open(stack)
        starts, started = [t.step for t in trainers], time.monotonic()
        while active := [i for i, t in enumerate(trainers) if t.step < t.config.steps]:
            for i, loss in zip(active, step_together([trainers[i] for i in active])):
                trainers[i].after_step(loss, started, starts[i])
        for t in trainers:
            if t.step > t.saved_step:
                t.save()
    return [t.result() for t in trainers]


def train(backend: Backend, config: TrainConfig, references: list[Reference], out_dir: Path,
          on_progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
          existing_names: Iterable[str] = ()) -> TrainResult:
    """Train the pair NAME / NAME-neg from ``references`` and write it to ``out_dir``."""
    return Trainer(backend, config, references, out_dir, on_progress, should_stop, existing_names).run()
