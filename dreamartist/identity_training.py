"""Identity mode's training (Beyond Inserting): the objective and the run.

One micro-batch: the face image augmented and encoded; t and eps drawn; the module's tokens; per row the prompt
encoded twice, with the stage s(t)'s K token and with its V token; ONE UNet call whose cross-attentions take keys from
the K context and values from the V context; L = L_LDM + lambda * L_attn, the attention loss comparing this call's
maps with those the reference prompt's keys give (``identity_control``). Only the module's parameters train.

The run is the DreamArtist trainer's (lock, checks, optimiser, resume, saves, progress, stop), writing an identity.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import fileops, identityfiles, losses, pairfiles, size_conditioning
from .attention_control import controlled
from .augment import augment
from .backend import POOLED, TIME_IDS, Conditioning
from .config import IdentityConfig
from .errors import InputError, NameTaken
from .identity import IdentityModule, IdentityTokens, K, V, as_tokens, stage_of
from .identity_control import IdentityControl
from .names import negative_name
from .objective import GroupSettings, Params
from .sampling import grid, sample
from .templates import fill
from .trainer import PREVIEW_STEPS, STATE_VERSION, Trainer, _detached, _NonFinite

GROUP = "identity"


class IdentityObjective:
    """The module, its tokens, and the loss of one micro-batch."""

    def __init__(self, backend, config: IdentityConfig):
        self.backend, self.config = backend, config
        self.name = config.name
        self.templates = config.template_lines
        init = backend.word_vectors(config.class_word)
        lengths = {int(v.shape[0]) for v in init.values()}
        if lengths != {1}:
            raise InputError(f"The class word {config.class_word!r} is not one token for this model's tokenizer; "
                             "identity mode needs a word of one token (e.g. person), so that the reference prompt "
                             "lines up with the prompt token by token.")
        outputs = config.stages * (2 if config.kv_split else 1)
        with torch.device("meta"):  # parameters as shapes only: the trainer's leaves fill them (functional_call)
            self.module = IdentityModule({k: v.to(backend.device) for k, v in init.items()}, outputs)
        self.module.requires_grad_(False)
        self.control = IdentityControl(config.attention_levels, config.attention_reduction)
        self._references: dict[str, torch.Tensor] = {}
        self.last_terms: tuple[float, float] = (0.0, 0.0)  # (L_LDM, lambda * L_attn) of the last micro-batch

    def settings(self) -> dict[str, GroupSettings]:
        return {GROUP: GroupSettings(self.config.lr, self.config.weight_decay, 0.0)}

    def initial(self, generator: torch.Generator) -> Params:
        """ldm's default initialisation of the block, seeded from the run's generator."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            fresh = IdentityModule({k: v for k, v in zip(self.module.keys, self._init_rows())}, self.module.outputs)
        return {GROUP: {k: v.detach().clone() for k, v in fresh.named_parameters()}}

    def _init_rows(self) -> list[torch.Tensor]:
        return list(self.module.initial.cpu().split(self.module.dims, dim=-1))

    def tokens(self, params: Params, dropout_seed: int | None = None) -> IdentityTokens:
        """The stage tokens; with ``dropout_seed`` in training mode (the block's dropout drawn from that seed)."""
        module = self.module.train(dropout_seed is not None)
        if dropout_seed is None:
            outputs = torch.func.functional_call(module, params[GROUP], ())
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(dropout_seed)
                outputs = torch.func.functional_call(module, params[GROUP], ())
        return as_tokens(outputs, self.config.stages, self.config.kv_split)

    def reference(self, line: str) -> torch.Tensor:
        """The reference prompt's context (the template line with the class word), (1, tokens, dim), cached."""
        if line not in self._references:
            with torch.no_grad():
                self._references[line] = self.backend.encode([fill(line, self.config.class_word)]).context.detach()
        return self._references[line]

    def loss(self, params: Params, references: list, generator: torch.Generator,
             latents: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-batch's loss; ``latents`` are the references' own, encoded once by the run, which serve where
        augmentation is off (with it on, each step encodes its own augmented copy)."""
        backend, config, b = self.backend, self.config, len(references)
        device = backend.device
        if config.augment or latents is None:
            pixels = torch.stack([augment(r.pixels, generator) if config.augment else r.pixels for r in references])
            with torch.no_grad():
                latents = backend.vae_encode(pixels.to(device))
        lines = torch.randint(0, len(self.templates), (b,), generator=generator).tolist()
        T = backend.alphas_cumprod.shape[0]
        t = torch.randint(0, T, (b,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        abar = backend.alphas_cumprod[t].to(device, torch.float32).view(-1, 1, 1, 1)
        tokens = self.tokens(params, dropout_seed)
        stages = stage_of(t, config.stages, T).tolist()
        keys, values = [], []
        for line, stage in zip(lines, stages):
            prompt = [fill(self.templates[line], self.name)]
            keys.append(backend.encode(prompt, {self.name: tokens.vectors(stage, K)}))
            if config.kv_split:
                values.append(backend.encode(prompt, {self.name: tokens.vectors(stage, V)}).context)
        cond = _stacked(keys)
        cond.extras[TIME_IDS] = size_conditioning.for_references(references)
        attention = config.attention_weight > 0
        reference = torch.cat([self.reference(self.templates[line]) for line in lines]) if attention else None
        with self.control.call(values=torch.cat(values) if values else None, reference=reference):
            out = backend.unet(losses.add_noise(latents, noise, abar), t.to(device), cond)
            attn = self.control.take_loss().mean() if attention else out.new_zeros(())
        goal = losses.target(backend.prediction_type, latents, noise, abar)
        ldm = losses.da_loss(out, goal, None)
        weighted = config.attention_weight * attn
        self.last_terms = (float(ldm.detach()), float(weighted.detach()))
        return ldm + weighted


def _stacked(conds: list[Conditioning]) -> Conditioning:
    extras = {key: torch.cat([c.extras[key] for c in conds]) for key in conds[0].extras if key == POOLED}
    return Conditioning(torch.cat([c.context for c in conds]), extras=extras)


class IdentityTrainer(Trainer):
    """One identity run of ``config.name`` into ``out_dir``; ``references`` holds the one face image (framed). The
    optional ordinary embedding goes to ``export_dir`` (default ``out_dir``)."""

    kind = "identity"

    def __init__(self, *args, export_dir: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.export_dir = Path(export_dir) if export_dir is not None else self.out_dir

    def make_objective(self):
        return IdentityObjective(self.backend, self.config)

    def check_resumable(self) -> None:
        self._saved()

    def _saved(self) -> identityfiles.IdentityFile:
        path = identityfiles.path_of(self.out_dir, self.name)
        if not path.is_file():
            raise InputError(f"There is no identity {self.name} to resume in {self.out_dir}; turn off Resume to "
                             "train a new one.")
        saved = identityfiles.load_identity(path)
        identityfiles.check_compatible(saved, self.backend.embedding_dims)
        return saved

    def _check_output(self) -> None:
        if self.config.resume:
            return
        names = {self.name.lower(), negative_name(self.name).lower()}
        if self.name.lower() in self.existing_names or (
                not self.config.overwrite and identityfiles.path_of(self.out_dir, self.name).exists()):
            raise NameTaken(f"An embedding or identity named {self.name!r} already exists; choose another name, or "
                            "turn on Overwrite (or Resume to continue it).")
        if pairfiles.find_clashes(self.out_dir, sorted(names)):
            raise NameTaken(f"A pair named {self.name!r} is in {self.out_dir}; choose another name for the identity.")

    def saved_values(self, state: dict) -> tuple[Params, int]:
        """The trained block: from the resume state (where it is saved), or from an identity file written when the
        block was kept in it."""
        saved = self._saved()
        if saved.module:
            return {GROUP: saved.module}, saved.step
        if state.get("step") != saved.step or GROUP not in state.get("groups", {}):
            raise InputError(f"{saved.path.name} is resumed from its trained block in {self.name}"
                             f"{pairfiles.STATE_SUFFIX} (step {saved.step}), which is missing or of another step; "
                             "train a new identity instead.")
        return {GROUP: state["groups"][GROUP]["live"]}, saved.step

    def _check_shapes(self, group, saved, fresh) -> None:
        if {k: tuple(v.shape) for k, v in saved.items()} != {k: tuple(v.shape) for k, v in fresh.items()}:
            raise InputError("The saved identity has another number of stages or K/V split than this run's; set them "
                             "as they were, or train a new identity.")

    def open(self, stack: contextlib.ExitStack) -> None:
        super().open(stack)
        stack.enter_context(controlled(self.backend, self.objective.control))

    def _optimizer_step(self) -> float:
        total = 0.0
        for _ in range(self.config.grad_accum):
            picks = torch.randint(0, len(self.references), (self.config.batch_size,), generator=self.generator)
            picked = picks.tolist()
            loss = self.objective.loss(self.params, [self.references[i] for i in picked], self.generator,
                                       torch.cat([self.latents[i] for i in picked]))
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise _NonFinite(f"The loss became {value}")
            total += value / self.config.grad_accum
            self.scaler.scale(loss / self.config.grad_accum).backward()
        self.update()
        return total

    def tokens(self) -> IdentityTokens:
        with torch.no_grad():
            return self.objective.tokens(self.params)

    def save(self) -> list[Path]:
        config, backend = self.config, self.backend
        live = _detached(self.params)
        state = {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "losses": list(self.losses),
                 "generator": self.generator.get_state(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "config": config.to_dict(),
                 "groups": {g: {"live": live[g], "ema": None} for g in live}}
        tokens = self.tokens()
        meta = dict(kv_split=config.kv_split, step=self.step, total_steps=config.steps, class_word=config.class_word,
                    template=config.template, reference_prompt=fill(config.template_lines[0], config.class_word),
                    attention_weight=config.attention_weight, attention_layers=config.attention_layers,
                    attention_reduction=config.attention_reduction, lr=config.lr, augment=config.augment,
                    base_model_hash=backend.model_hash, base_model_name=backend.model_name)
        # the block goes in the resume state only: the identity file holds what generation needs (an SDXL block is
        # 0.8 GB, 2.5 GB with Adam's moments)
        files = identityfiles.save_identity(self.out_dir, self.name, tokens, {}, meta, state)
        self.saved_files = [f for f in files if not f.name.endswith(pairfiles.STATE_SUFFIX)]
        if config.export_embedding:  # a file of its own, written whole or not at all
            export = self.export_dir / f"{identityfiles.export_name(self.name)}.pt"
            fileops.make_folder(self.export_dir)
            fileops.write_file(export, pairfiles.embedding_bytes(
                export.stem, tokens.stage_mean_key(), backend.model_hash, backend.model_name, self.step))
            self.saved_files.append(export)
        self.saved_step = self.step
        return self.saved_files

    def preview(self, on_step=None):
        tokens = self.tokens()
        images = []
        for i, line in enumerate(self.config.template_lines[:4]):
            images += sample(self.backend, fill(line, self.name), "", guidance=7.0, steps=PREVIEW_STEPS,
                             width=self.width, height=self.height, seed=self.seed + i,
                             on_step=on_step and (lambda i, n: on_step()), identities={self.name: tokens})
        return grid(images)
