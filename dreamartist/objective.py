"""The DreamArtist objective (paper sec. 4): what it trains, and the loss of one micro-batch.

Trainable groups: ``pos_words`` (S^p) and ``neg_words`` (S^n), each a dict encoder key -> (n, dim) tensor; with
adapters (DreamArtist++) also ``unet_pos`` / ``unet_neg`` (phi^p_mu / phi^n_mu) and ``te_pos`` / ``te_neg``
(phi^p_t / phi^n_t), each a dict "<layer>.lora_down|up" -> tensor.
One micro-batch: t and eps shared by both branches; ONE UNet call on the rows [S^n rows; S^p rows], phi^n acting
on the S^n rows and phi^p on the S^p rows (also in the text encoder's call), each row with its reference's size
conditioning (SDXL);
eps_hat = eps_n + gamma(t) (eps_p - eps_n); L = L_da (eq. 3) + w_rec L_rec (eqs. 5, 6).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import adapters, losses, size_conditioning
from .backend import TIME_IDS, Backend, WordVectors
from .config import TrainConfig
from .images import Reference
from .names import negative_name
from .templates import fill

POS, NEG = "pos_words", "neg_words"
BRANCHES = ("pos", "neg")  # the row labels of the two CFG branches, and the adapters' ids
Params = dict[str, dict[str, torch.Tensor]]  # group name -> encoder key (or layer name) -> leaf tensor


@dataclass(frozen=True)
class GroupSettings:
    """How the optimiser treats one trainable group."""

    lr: float
    weight_decay: float
    ema: float  # decay of the group's EMA; 0 for none


class DreamArtistObjective:
    """Positive-negative prompt tuning of the pair ``config.name`` / NAME-neg on ``backend``."""

    def __init__(self, backend: Backend, config: TrainConfig):
        self.backend, self.config = backend, config
        self.name, self.neg_name = config.name, negative_name(config.name)
        self.gamma = config.gamma_schedule
        self.templates = config.template_lines

    def settings(self) -> dict[str, GroupSettings]:
        c = self.config
        groups = {POS: GroupSettings(c.lr, c.weight_decay, c.ema_pos),
                  NEG: GroupSettings(c.lr * c.neg_lr_mult, c.weight_decay, c.ema_neg)}
        if c.adapters:
            groups |= {"unet_pos": GroupSettings(c.unet_lr_pos, c.weight_decay, 0.0),
                       "unet_neg": GroupSettings(c.unet_lr_neg, c.weight_decay, 0.0),
                       "te_pos": GroupSettings(c.text_lr, c.weight_decay, 0.0),
                       "te_neg": GroupSettings(c.text_lr, c.weight_decay, 0.0)}
        return groups

    def lengths(self) -> dict[str, int]:
        """Vectors per pseudo-word, which a resumed run cannot change."""
        return {POS: self.config.pos_len, NEG: self.config.neg_len}

    def initial(self, generator: torch.Generator) -> Params:
        """S^p from the init words (repeated or cut to length), S^n from EOS plus N(0, sigma^2) (sec. 4.1)."""
        init_words = self.config.init_words.strip()
        words = self.backend.word_vectors(init_words) if init_words else {}
        pos, neg = {}, {}
        for key, end in self.backend.eos_vector().items():
            init = words.get(key)
            if init is None or init.shape[0] == 0:
                init = end.unsqueeze(0)
            pos[key] = init[[i % init.shape[0] for i in range(self.config.pos_len)]].float()
            noise = torch.randn((self.config.neg_len, end.shape[-1]), generator=generator)
            neg[key] = end.float().cpu().expand(self.config.neg_len, -1) + self.config.neg_noise * noise
        groups = {POS: pos, NEG: neg}
        if self.config.adapters:
            layers = self.backend.adapter_layers()
            ranks = {adapters.UNET: lambda layer: adapters.unet_rank(layer.out_features, self.config.unet_rank),
                     adapters.TEXT: lambda layer: self.config.text_rank}
            for branch in BRANCHES:
                for part, rank_of in ranks.items():
                    fresh = adapters.new_adapter(layers[part], rank_of, generator)
                    groups[f"{part}_{branch}"] = adapters.flatten(fresh)
        return groups

    def patches(self, params: Params, strengths: dict[str, float] | None = None, training: bool = False) -> dict:
        """What ``Backend.patched`` installs: each branch's adapters, acting on the rows labelled with it."""
        strengths = strengths or {branch: 1.0 for branch in BRANCHES}
        return {part: {branch: (adapters.unflatten(params[f"{part}_{branch}"]), strengths[branch])
                       for branch in BRANCHES if f"{part}_{branch}" in params}
                for part in (adapters.UNET, adapters.TEXT)}

    def words(self, params: Params) -> WordVectors:
        return {self.name: params[POS], self.neg_name: params[NEG]}

    def loss(self, params: Params, references: list[Reference], latents: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """Loss of one micro-batch: ``references`` and their ``latents`` (B,C,h,w) drawn by the loop."""
        backend, device, b = self.backend, self.backend.device, len(references)
        lines = torch.randint(0, len(self.templates), (b,), generator=generator).tolist()
        T = backend.alphas_cumprod.shape[0]
        t = torch.randint(0, T, (b,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        abar = backend.alphas_cumprod[t].to(device, torch.float32).view(-1, 1, 1, 1)
        z_t = losses.add_noise(latents, noise, abar)
        pos_text = [fill(self.templates[j], self.name, r.caption) for j, r in zip(lines, references)]
        neg_text = [fill(self.templates[j], self.neg_name, r.caption) for j, r in zip(lines, references)]
        rows = ("neg",) * b + ("pos",) * b
        with self._dropout_seeded(generator), \
                backend.patched(self.patches(params), self.config.adapter_dropout, training=True):
            cond = backend.encode(neg_text + pos_text, self.words(params), rows)
            cond.extras[TIME_IDS] = size_conditioning.for_references(references).repeat(2, 1)  # SDXL: per image
            out_neg, out_pos = backend.unet(torch.cat([z_t, z_t]), torch.cat([t, t]).to(device), cond).chunk(2)
        guided = losses.guide(out_neg, out_pos, self.gamma(t, T).to(device))
        loss = losses.da_loss(guided, losses.target(backend.prediction_type, latents, noise, abar),
                              _weights(references, device))
        if self.config.reconstruction and self.config.rec_weight > 0:
            z0_hat = losses.predict_z0(backend.prediction_type, guided, z_t, abar)
            pixels = torch.stack([r.pixels for r in references]).to(device)  # reference pixels live on the CPU
            loss = loss + self.config.rec_weight * losses.reconstruction_loss(backend.vae_decode(z0_hat), pixels)
        return loss

    @contextlib.contextmanager
    def _dropout_seeded(self, generator: torch.Generator) -> Iterator[None]:
        """The adapters' dropout masks drawn from the run's own seed: torch's global generator (which they use, and
        which a checkpointed block's recomputation restores) seeded from ``generator`` for the forward pass, and
        put back as it was afterwards."""
        if not (self.config.adapters and self.config.adapter_dropout):
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            yield

    def preview_prompts(self) -> list[tuple[str, str]]:
        """(prompt, negative prompt) for up to four previews: the first template lines with S^p / S^n."""
        return [(fill(line, self.name), fill(line, self.neg_name)) for line in self.templates[:4]]


def _weights(references: list[Reference], device: torch.device) -> torch.Tensor | None:
    """The loss weight per latent cell (B,1,h,w); references without a mask weigh 1 everywhere."""
    if all(r.weight is None for r in references):
        return None
    ones = torch.ones_like(next(r.weight for r in references if r.weight is not None))
    return torch.stack([ones if r.weight is None else r.weight for r in references]).to(device)
