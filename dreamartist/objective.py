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
        return joint_loss([Part(self, params, references, latents, generator)])[0]

    def draw(self, part: Part) -> _Draw:
        """The micro-batch's random draws from the run's own generator: template lines, t and eps."""
        backend, b = self.backend, len(part.references)
        lines = torch.randint(0, len(self.templates), (b,), generator=part.generator).tolist()
        T = backend.alphas_cumprod.shape[0]
        t = torch.randint(0, T, (b,), generator=part.generator)
        noise = torch.randn(part.latents.shape, generator=part.generator).to(backend.device)
        abar = backend.alphas_cumprod[t].to(backend.device, torch.float32).view(-1, 1, 1, 1)
        pos_text = [fill(self.templates[j], self.name, r.caption) for j, r in zip(lines, part.references)]
        neg_text = [fill(self.templates[j], self.neg_name, r.caption) for j, r in zip(lines, part.references)]
        return _Draw(neg_text + pos_text, t, noise, abar, losses.add_noise(part.latents, noise, abar))

    def rec_on(self) -> bool:
        return self.config.reconstruction and self.config.rec_weight > 0

    def preview_prompts(self) -> list[tuple[str, str]]:
        """(prompt, negative prompt) for up to four previews: the first template lines with S^p / S^n."""
        return [(fill(line, self.name), fill(line, self.neg_name)) for line in self.templates[:4]]


@dataclass
class Part:
    """One run's share of a step: its objective, its parameters and the micro-batch its loop drew."""

    objective: DreamArtistObjective
    params: Params
    references: list[Reference]
    latents: torch.Tensor  # (B,C,h,w)
    generator: torch.Generator


@dataclass
class _Draw:
    prompts: list[str]  # the S^n rows' prompts, then the S^p rows'
    t: torch.Tensor  # (B,) on the CPU
    noise: torch.Tensor
    abar: torch.Tensor  # (B,1,1,1)
    z_t: torch.Tensor


def joint_loss(parts: list[Part]) -> list[torch.Tensor]:
    """Each part's micro-batch loss, all parts through ONE text-encoder call and ONE UNet call.

    The parts are independent runs on the same backend (distinct names; their adapters act on their own rows
    only), so the sum of the losses has, for each run's parameters, exactly the gradient of that run alone; the
    batched call is what makes several small runs cheap. Each run draws from its own generator, in the order a
    run alone draws. One part is an ordinary step.
    """
    backend = parts[0].objective.backend
    device = backend.device
    draws = [p.objective.draw(p) for p in parts]
    words: dict = {}
    for p in parts:
        mine = p.objective.words(p.params)
        if words.keys() & mine.keys():
            raise ValueError(f"runs stepped together need distinct names; {sorted(words.keys() & mine.keys())} twice")
        words |= mine
    prefixes = [""] if len(parts) == 1 else [f"{i}:" for i in range(len(parts))]  # adapter ids per run
    patches: dict = {}
    rows: tuple = ()
    for p, prefix in zip(parts, prefixes):
        for part, acting in p.objective.patches(p.params).items():
            patches.setdefault(part, {}).update({prefix + branch: value for branch, value in acting.items()})
        b = len(p.references)
        rows += (prefix + "neg",) * b + (prefix + "pos",) * b
    dropouts = {p.objective.config.adapter_dropout for p in parts if p.objective.config.adapters}
    if len(dropouts) > 1:
        raise ValueError("runs stepped together need the same adapter dropout")
    dropout = dropouts.pop() if dropouts else 0.0
    with _dropout_seeded(parts), backend.patched(patches, dropout, training=True):
        cond = backend.encode([text for d in draws for text in d.prompts], words, rows)
        cond.extras[TIME_IDS] = torch.cat([size_conditioning.for_references(p.references).repeat(2, 1)
                                           for p in parts])  # SDXL: per image
        z = torch.cat([torch.cat([d.z_t, d.z_t]) for d in draws])
        t = torch.cat([torch.cat([d.t, d.t]) for d in draws]).to(device)
        outputs = backend.unet(z, t, cond).split([2 * len(p.references) for p in parts])
    results, decoding, T = [], [], backend.alphas_cumprod.shape[0]
    for p, d, out in zip(parts, draws, outputs):
        objective = p.objective
        out_neg, out_pos = out.chunk(2)
        guided = losses.guide(out_neg, out_pos, objective.gamma(d.t, T).to(device))
        goal = losses.target(backend.prediction_type, p.latents, d.noise, d.abar)
        results.append(losses.da_loss(guided, goal, _weights(p.references, device)))
        if objective.rec_on():
            decoding.append((len(results) - 1, losses.predict_z0(backend.prediction_type, guided, d.z_t, d.abar)))
    if decoding:  # eq. 6 for every run that has it, through one VAE call
        decoded = backend.vae_decode(torch.cat([z0 for _, z0 in decoding])).split([len(z0) for _, z0 in decoding])
        for (i, _), pixels_hat in zip(decoding, decoded):
            p = parts[i]
            pixels = torch.stack([r.pixels for r in p.references]).to(device)  # reference pixels live on the CPU
            results[i] = results[i] + p.objective.config.rec_weight * losses.reconstruction_loss(pixels_hat, pixels)
    return results


@contextlib.contextmanager
def _dropout_seeded(parts: list[Part]) -> Iterator[None]:
    """The adapters' dropout masks drawn from the runs' own seeds: torch's global generator (which they use, and
    which a checkpointed block's recomputation restores) seeded from the first such run's generator for the
    forward pass, and put back as it was afterwards. Every run with dropout draws its seed, as it does alone."""
    seeds = [int(torch.randint(0, 2**62, (1,), generator=p.generator)) for p in parts
             if p.objective.config.adapters and p.objective.config.adapter_dropout]
    if not seeds:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds[0])
        yield


def _weights(references: list[Reference], device: torch.device) -> torch.Tensor | None:
    """The loss weight per latent cell (B,1,h,w); references without a mask weigh 1 everywhere."""
    if all(r.weight is None for r in references):
        return None
    ones = torch.ones_like(next(r.weight for r in references if r.weight is not None))
    return torch.stack([ones if r.weight is None else r.weight for r in references]).to(device)
