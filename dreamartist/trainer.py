"""DreamArtist positive-negative prompt tuning (paper sec. 4), exactly one training loop for every host.

Each micro-batch: t and eps shared by both branches; ONE UNet call on the rows [S^n rows; S^p rows];
eps_hat = eps_n + gamma(t) (eps_p - eps_n); L = L_da (eq. 3) + w_rec L_rec (eqs. 5, 6). Only S^p and S^n
are optimised; the backend keeps every model weight frozen and restores the model afterwards.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import losses, pairfiles
from .backend import Backend
from .config import TrainConfig
from .errors import InputError, TrainingStopped
from .gamma import parse_gamma
from .images import Reference
from .names import negative_name
from .sampling import grid, sample
from .templates import fill, load_template

PREVIEW_STEPS = 20


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


class _NonFinite(Exception):
    pass


def _grad_scaler(device: torch.device):
    """Loss scaling for fp16 on CUDA (the webui's own textual-inversion trainer scales too); off elsewhere."""
    enabled = device.type == "cuda"
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3, as in webui 1.6-1.10


def _cpu_copy(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in vectors.items()}


def _trainable(vectors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Leaf float32 copies on ``device`` that the optimiser owns."""
    return {k: v.detach().to(device, torch.float32).clone().contiguous().requires_grad_(True)
            for k, v in vectors.items()}


class Trainer:
    """One training run; ``run()`` returns a TrainResult or raises a DreamArtistError."""

    def __init__(self, backend: Backend, config: TrainConfig, references: list[Reference], out_dir: Path,
                 on_progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, existing_names: Iterable[str] = ()):
        if not references:
            raise InputError("No reference image was given.")
        self.backend, self.config, self.references = backend, config, references
        self.out_dir = Path(out_dir)
        self.on_progress = on_progress or (lambda progress: None)
        self.should_stop = should_stop or (lambda: False)
        self.name, self.neg_name = config.name, negative_name(config.name)
        self.gamma = parse_gamma(config.gamma)
        self.templates = load_template(config.template)
        self._check_names(existing_names)
        self.seed = config.seed if config.seed >= 0 else int(torch.randint(0, 2**31 - 1, ()).item())
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step, self.losses = 0, []
        self.pos, self.neg = self._initial_vectors()
        self.ema_pos = {k: v.detach().clone() for k, v in self.pos.items()} if config.ema_pos else None
        self.ema_neg = {k: v.detach().clone() for k, v in self.neg.items()} if config.ema_neg else None
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.pos.values()), "lr": config.lr},
             {"params": list(self.neg.values()), "lr": config.lr * config.neg_lr_mult}],
            betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)
        self.scaler = _grad_scaler(backend.device)
        if config.resume:
            self._resume()

    # -- setup ---------------------------------------------------------------------------------------
    def _check_names(self, existing_names: Iterable[str]) -> None:
        if self.config.overwrite or self.config.resume:
            return
        taken = {n.lower() for n in existing_names}
        for name in (self.name, self.neg_name):
            if name.lower() in taken:
                raise InputError(f"An embedding named {name!r} already exists; choose another name, "
                                 "or turn on Overwrite (or Resume to continue it).")
        clashes = pairfiles.find_clashes(self.out_dir, [self.name, self.neg_name])
        if clashes:
            raise InputError(f"{clashes[0]} already exists; choose another name, or turn on Overwrite "
                             "(or Resume to continue it).")

    def _initial_vectors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """S^p from the init words (repeated or cut to length), S^n from EOS plus N(0, sigma^2) (sec. 4.1)."""
        words = self.backend.word_vectors(self.config.init_words) if self.config.init_words.strip() else {}
        eos = self.backend.eos_vector()
        pos, neg = {}, {}
        for key, end in eos.items():
            init = words.get(key)
            if init is None or init.shape[0] == 0:
                init = end.unsqueeze(0)
            rows = [i % init.shape[0] for i in range(self.config.pos_len)]
            pos[key] = init[rows].float().clone()
            noise = torch.randn((self.config.neg_len, end.shape[-1]), generator=self.generator)
            neg[key] = end.float().expand(self.config.neg_len, -1) + self.config.neg_noise * noise.to(end.device)
        return _trainable(pos, self.backend.device), _trainable(neg, self.backend.device)

    def _resume(self) -> None:
        pos_file, neg_file = pairfiles.load_pair(self.out_dir, self.name)
        for file in (pos_file, neg_file):
            pairfiles.check_compatible(file.vectors, self.backend.embedding_dims, file.path)
        self.step = int(pos_file.step or 0)
        state = pairfiles.load_state(self.out_dir, self.name) or {}
        if state.get("step") != self.step:
            state = {}  # the state belongs to another save of this name: continue from the files alone
        pos, neg = state.get("live_pos", pos_file.vectors), state.get("live_neg", neg_file.vectors)
        self.pos, self.neg = _trainable(pos, self.backend.device), _trainable(neg, self.backend.device)
        groups = self.optimizer.param_groups
        groups[0]["params"], groups[1]["params"] = list(self.pos.values()), list(self.neg.values())
        if state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.losses = list(state.get("losses", []))
            self.seed = int(state.get("seed", self.seed))
        if self.ema_pos is not None:
            self.ema_pos = {k: v.to(self.backend.device) for k, v in state.get("ema_pos", pos_file.vectors).items()}
        if self.ema_neg is not None:
            self.ema_neg = {k: v.to(self.backend.device) for k, v in state.get("ema_neg", neg_file.vectors).items()}
        if self.step >= self.config.steps:
            raise InputError(f"{self.name} has already been trained for {self.step} steps; "
                             f"ask for more than {self.step} steps to continue it.")

    # -- one optimiser step ------------------------------------------------------------------------
    def _draw(self, n: int) -> torch.Tensor:
        return torch.randint(0, n, (self.config.batch_size,), generator=self.generator)

    def _micro_batch_loss(self) -> torch.Tensor:
        """Loss of one micro-batch of ``batch_size`` references (eq. 3, plus eq. 6 when enabled)."""
        b, backend, device = self.config.batch_size, self.backend, self.backend.device
        picks = self._draw(len(self.references)).tolist()
        lines = self._draw(len(self.templates)).tolist()
        refs = [self.references[i] for i in picks]
        z0 = torch.cat([self.latents[i] for i in picks])  # (B,C,h,w)
        T = backend.alphas_cumprod.shape[0]
        t = torch.randint(0, T, (b,), generator=self.generator)
        noise = torch.randn(z0.shape, generator=self.generator).to(device)
        abar = backend.alphas_cumprod[t].to(device, torch.float32).view(-1, 1, 1, 1)
        z_t = losses.add_noise(z0, noise, abar)
        pos_text = [fill(self.templates[j], self.name, r.caption) for j, r in zip(lines, refs)]
        neg_text = [fill(self.templates[j], self.neg_name, r.caption) for j, r in zip(lines, refs)]
        words = {self.name: self.pos, self.neg_name: self.neg}
        cond = backend.encode(neg_text + pos_text, words, ("neg",) * b + ("pos",) * b)
        t_rows = torch.cat([t, t]).to(device)
        out_neg, out_pos = backend.unet(torch.cat([z_t, z_t]), t_rows, cond).chunk(2)  # one call, 2B rows
        guided = losses.guide(out_neg, out_pos, self.gamma(t, T).to(device))
        weight = None
        if any(r.weight is not None for r in refs):  # references without a mask weigh 1 everywhere
            ones = torch.ones_like(next(r.weight for r in refs if r.weight is not None))
            weight = torch.stack([ones if r.weight is None else r.weight for r in refs]).to(device)
        loss = losses.da_loss(guided, losses.target(backend.prediction_type, z0, noise, abar), weight)
        if self.config.reconstruction and self.config.rec_weight > 0:
            z0_hat = losses.predict_z0(backend.prediction_type, guided, z_t, abar)
            pixels = torch.stack([r.pixels for r in refs]).to(device)  # reference pixels live on the CPU
            loss = loss + self.config.rec_weight * losses.reconstruction_loss(backend.vae_decode(z0_hat), pixels)
        return loss

    def _optimizer_step(self) -> float:
        """Accumulate ``grad_accum`` micro-batches, then one AdamW step; returns the mean loss."""
        total = 0.0
        for _ in range(self.config.grad_accum):
            loss = self._micro_batch_loss()
            value = loss.item()  # one device sync per micro-batch
            if not math.isfinite(value):
                raise _NonFinite(value)
            self.scaler.scale(loss / self.config.grad_accum).backward()
            total += value / self.config.grad_accum
        params = [*self.pos.values(), *self.neg.values()]
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if not self.scaler.is_enabled() and not all(torch.isfinite(p.grad).all() for p in params
                                                     if p.grad is not None):
            raise _NonFinite(total)
        self.scaler.step(self.optimizer)  # with fp16 loss scaling, a step whose gradients overflowed is skipped
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for ema, live, decay in ((self.ema_pos, self.pos, self.config.ema_pos),
                                     (self.ema_neg, self.neg, self.config.ema_neg)):
                if ema is not None:
                    for k in ema:
                        ema[k].mul_(decay).add_(live[k].detach(), alpha=1 - decay)
        return total

    # -- outputs -----------------------------------------------------------------------------------
    def _saved_vectors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The vectors the files hold: the EMA ones where EMA is on."""
        pos = self.ema_pos if self.ema_pos is not None else self.pos
        neg = self.ema_neg if self.ema_neg is not None else self.neg
        return pos, neg

    def save(self) -> list[Path]:
        """Write the pair and the resume state atomically; the files always hold a finished step."""
        pos, neg = (_cpu_copy(v) for v in self._saved_vectors())
        state = {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "scaler": self.scaler.state_dict(), "losses": list(self.losses), "step": self.step, "seed": self.seed,
                 "live_pos": _cpu_copy(self.pos), "live_neg": _cpu_copy(self.neg)}  # the files may hold EMA vectors
        if self.ema_pos is not None:
            state["ema_pos"] = _cpu_copy(self.ema_pos)
        if self.ema_neg is not None:
            state["ema_neg"] = _cpu_copy(self.ema_neg)
        return pairfiles.save_pair(
            self.out_dir, self.name, pos, neg, fmt=self.config.file_format, overwrite=True, step=self.step,
            total_steps=self.config.steps, gamma=str(self.gamma), checkpoint_hash=self.backend.model_hash,
            checkpoint_name=self.backend.model_name, state=state)

    def preview(self) -> Image.Image:
        """Samples with the pair as it is saved (EMA vectors when on), at the training gamma (up to 4)."""
        pos, neg = self._saved_vectors()
        words = {self.name: pos, self.neg_name: neg}
        images = []
        for i, line in enumerate(self.templates[:4]):
            images += sample(self.backend, fill(line, self.name), fill(line, self.neg_name), words,
                             guidance=self.gamma, steps=PREVIEW_STEPS, width=self.config.width,
                             height=self.config.height, seed=self.seed + i)
        return grid(images)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        config, start_step, started = self.config, self.step, time.monotonic()
        with self.backend.training(config.gradient_checkpointing):
            with torch.no_grad():
                self.latents = [self.backend.vae_encode(r.pixels.unsqueeze(0).to(self.backend.device))
                                for r in self.references]
            stopped, files, preview = "", [], None
            try:
                while self.step < config.steps:
                    if self.should_stop():
                        stopped = "interrupted"
                        break
                    loss = self._optimizer_step()
                    self.step += 1
                    self.losses.append(loss)
                    if config.save_every and self.step % config.save_every == 0:
                        files = self.save()
                    preview = None
                    if config.preview_every and self.step % config.preview_every == 0:
                        preview = self.preview()
                    rate = (time.monotonic() - started) / (self.step - start_step)
                    self.on_progress(Progress(self.step, config.steps, loss, self.optimizer.param_groups[0]["lr"],
                                              rate * (config.steps - self.step), self.losses, preview))
            except KeyboardInterrupt:
                stopped = "interrupted"
            except _NonFinite as error:
                self._stop_with(f"The loss became {error.args[0]} at step {self.step + 1}", "Try a lower "
                                "learning rate or gamma.")
            except torch.cuda.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                self._stop_with(f"Out of GPU memory at step {self.step + 1}", "Try a smaller width/height, "
                                "turn off the reconstruction loss, or turn on gradient checkpointing.")
            if self.step > start_step:
                files = self.save()
        final = self.losses[-1] if self.losses else None
        return TrainResult(files, self.step, final, list(self.losses), stopped, preview)

    def _stop_with(self, what: str, advice: str) -> None:
        """Keep the last good pair (the vectors before the failed step) and stop with a clear message."""
        self.optimizer.zero_grad(set_to_none=True)
        kept = ""
        if self.step > 0:
            files = self.save()
            kept = f" The last good pair (step {self.step}) is saved as {files[0].name} and {files[1].name}."
        raise TrainingStopped(f"{what}; training stopped.{kept} {advice}")


def train(backend: Backend, config: TrainConfig, references: list[Reference], out_dir: Path,
          on_progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
          existing_names: Iterable[str] = ()) -> TrainResult:
    """Train the pair NAME / NAME-neg from ``references`` and write it to ``out_dir``."""
    return Trainer(backend, config, references, out_dir, on_progress, should_stop, existing_names).run()
