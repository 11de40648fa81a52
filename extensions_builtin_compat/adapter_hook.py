"""PN adapters at generation time (webui 1.6-1.10 and the Forge family, SD1/SD2/SDXL): phi^p on the cond rows and
phi^n on the uncond rows of every UNet call of the CFG denoiser, for the images whose prompt uses the pair; phi^p on
the text-encoder rows of prompts that use S^p, phi^n on those of negative prompts that carry S^n ("pair" mode).

Modes: "pair" keeps S^n on the negative side and adds phi^n; "DA++" puts NAME + phi^p on the cond side and phi^n
alone on the uncond side (no S^n). In DA++ the negative prompt has no S^n to attach phi^n's text-encoder part
to: it acts on every negative prompt of a batch that uses the pair (the webui encodes each distinct negative
prompt once for the whole batch, so nothing finer exists).

Which UNet rows are cond and which uncond: the denoiser's layout (``on_cfg_denoiser``: cond rows image-major,
one per AND sub-prompt, then one uncond row per image) and a cursor over the rows of its UNet calls, which come
in increasing row order in every batching the webui uses (one call; batch_cond_uncond off; a separate uncond
call for prompts of other lengths; uncond skipped). An extension that calls the UNet more often within one
denoiser step (tiled diffusion) breaks that order; the rows then go unlabelled and no adapter acts. The Forge
family's samplers say it themselves: each UNet call carries ``cond_or_uncond`` in its transformer_options, one
entry per chunk of one row per image.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field

import torch
from modules import prompt_parser

from dreamartist import adapters, pairfiles
from dreamartist.attributes import attributes_restored

from . import embeddings, host, host_pairing
from .host_backend import layers_of, text_encoders, unet_of

MODES = ("pair", "DA++", "off")
log = logging.getLogger("dreamartist")
_active: list[GenerationAdapters] = []  # at most one: the generation in progress
_cache: dict[str, tuple[float, dict]] = {}  # adapter file -> (mtime, groups)


def load(name: str) -> dict | None:
    """The adapters saved with pair ``name`` (group -> named tensors), read once per file version."""
    path = os.path.join(embeddings.embeddings_dir(), f"{name}{pairfiles.ADAPTERS_SUFFIX}")
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return None
    if path not in _cache or _cache[path][0] != mtime:
        _cache[path] = (mtime, pairfiles.load_adapters(embeddings.embeddings_dir(), name))
    return _cache[path][1]


@dataclass
class Plan:
    """What one generation applies: per image, the pairs (with adapters) its prompt uses."""

    mode: str
    strengths: tuple[float, float]  # phi^p, phi^n
    images: list[frozenset[str]]  # per image of p.all_prompts
    hires_images: list[frozenset[str]]  # per image of p.all_hr_prompts (empty without hires fix)
    groups: dict[str, dict] = field(default_factory=dict)  # pair -> its adapter groups


class GenerationAdapters:
    """The hooks of one generation: the adapters on their layers, and the row labels of each UNet and
    text-encoder call; ``close`` removes them all."""

    def __init__(self, p, plan: Plan):
        self.plan, self.p = plan, p
        self.tag = secrets.token_hex(4)  # ids no training run (nor a leftover generation) shares
        self.batch: list[frozenset[str]] = []
        self.repeats: list[int] = []
        self.layout: tuple[int, int] | None = None  # (cond rows, all rows) of the current denoiser step
        self.cursor = 0
        self.stack = contextlib.ExitStack()
        model = p.sd_model
        self.encoder = host_pairing.prompt_encoder(model)
        layers = layers_of(model)
        pos, neg = plan.strengths
        for part in (adapters.UNET, adapters.TEXT):
            acting = {}
            for pair, groups in plan.groups.items():
                for branch, strength in (("pos", pos), ("neg", neg)):
                    if f"{part}_{branch}" in groups:
                        acting[self.id(pair, branch)] = (adapters.unflatten(groups[f"{part}_{branch}"]), strength)
            self.stack.enter_context(adapters.hooked(layers[part], acting))
        labelled = [(unet_of(model), self._label_unet_call)]
        labelled += [(encoder, self._label_text_call) for encoder in text_encoders(model).values()]  # SDXL: two
        for module, before in labelled:
            handles = (module.register_forward_pre_hook(before, with_kwargs=True),
                       module.register_forward_hook(self._unlabel))
            self.stack.callback(lambda hs=handles: [h.remove() for h in hs])
        self._tokens: list = []
        self.texts: list[str] | None = None  # the prompts being encoded, where the encoder sees token ids only
        if host.runs_forge_engine(model):
            self._watch_prompts(model)

    def _watch_prompts(self, model) -> None:
        """Forge's engines (Neo) give their transformer token ids, not prompts: for the generation, the model's
        get_learned_conditioning (the one entry point of a generation's prompts) notes which prompts it encodes."""
        original = model.get_learned_conditioning

        def get_learned_conditioning(texts):
            self.texts = texts
            try:
                return original(texts)
            finally:
                self.texts = None

        self.stack.enter_context(attributes_restored([(model, "get_learned_conditioning")]))
        model.get_learned_conditioning = get_learned_conditioning  # shadows the method on this instance only

    def id(self, pair: str, branch: str) -> str:
        return f"{pair}:{branch}@{self.tag}"

    # -- per batch and per step ------------------------------------------------------------------------
    def start_batch(self, index: int, batch_size: int, prompts: list[str], hires: bool = False) -> None:
        images = self.plan.hires_images if hires else self.plan.images
        self.batch = images[index * batch_size:index * batch_size + len(prompts)]
        self.repeats = [len(indexes) for indexes in prompt_parser.get_multicond_prompt_list(prompts)[0]]

    def on_cfg_denoiser(self, params) -> None:
        text_cond = params.text_cond
        n_cond = (text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond).shape[0]
        rows = params.x.shape[0]
        known = n_cond == sum(self.repeats) and rows == n_cond + len(self.batch)
        self.layout, self.cursor = ((n_cond, rows) if known else None), 0

    # -- row labels ------------------------------------------------------------------------------------
    def _unet_labels(self, count: int) -> list[frozenset] | None:
        if self.layout is None or self.cursor + count > self.layout[1]:
            return None
        n_cond = self.layout[0]
        cond_images = [i for i, r in enumerate(self.repeats) for _ in range(r)]
        labels = []
        for row in range(self.cursor, self.cursor + count):
            image, branch = (cond_images[row], "pos") if row < n_cond else (row - n_cond, "neg")
            labels.append(frozenset(self.id(pair, branch) for pair in self.batch[image]))
        self.cursor += count
        return labels

    def _chunk_labels(self, count: int, chunks: list[int]) -> list[frozenset] | None:
        """The Forge family's samplers: a UNet call is whole chunks of one row per image of the batch, chunk k of
        the cond (0) or uncond (1) branch as its transformer_options' ``cond_or_uncond`` says (one cond chunk per
        AND sub-prompt)."""
        images = len(self.batch)
        if not images or count != len(chunks) * images:
            return None
        return [frozenset(self.id(pair, "neg" if chunk else "pos") for pair in self.batch[image])
                for chunk in chunks for image in range(images)]

    def _label_unet_call(self, module, args, kwargs):
        count = (args[0] if args else kwargs["x"]).shape[0]
        chunks = (kwargs.get("transformer_options") or {}).get("cond_or_uncond")
        self._push(self._unet_labels(count) if chunks is None else self._chunk_labels(count, chunks))

    def _label_text_call(self, module, args, kwargs):
        texts = args[0] if args and not torch.is_tensor(args[0]) else self.texts
        rows = args[0].shape[0] if args and torch.is_tensor(args[0]) else None
        if texts is None or (rows is not None and rows != len(texts)):
            self._push(None)
            return
        side = "neg" if getattr(texts, "is_negative_prompt", False) else "pos"
        self._push([self._text_label(text, side) for text in texts])

    def _text_label(self, text: str, side: str) -> frozenset:
        if side == "neg" and self.plan.mode == "DA++":
            return frozenset(self.id(pair, "neg") for image in self.batch for pair in image)
        found = {name.lower() for name, _ in host_pairing.embedding_uses(self.encoder, text)}
        names = {pair.lower(): pair for pair in self.plan.groups}
        suffix = "-neg" if side == "neg" else ""
        return frozenset(self.id(names[n[:len(n) - len(suffix)]], side) for n in found
                         if n.endswith(suffix) and n[:len(n) - len(suffix)] in names)

    def _push(self, labels) -> None:
        manager = adapters.row_labels(labels)
        manager.__enter__()
        self._tokens.append(manager)

    def _unlabel(self, module, args, output):
        if self._tokens:
            self._tokens.pop().__exit__(None, None, None)

    def close(self) -> None:
        while self._tokens:  # labels a failed UNet call left: set in its request's context, gone with it
            with contextlib.suppress(ValueError):
                self._tokens.pop().__exit__(None, None, None)
        self.stack.close()


def plan_for(p, mode: str, strengths: tuple[float, float]) -> Plan | None:
    """The adapters this generation uses (None when there are none, or the mode is off)."""
    encoder = host_pairing.prompt_encoder(p.sd_model)
    if mode == "off" or encoder is None or not any(
            getattr(p.sd_model, f"is_{family}", False) for family in ("sd1", "sd2", "sdxl")):
        return None
    partners = {name.lower(): partner for name, partner in embeddings.partners().items()}
    groups: dict[str, dict] = {}

    def pairs_of(prompt: str) -> frozenset[str]:
        used = host_pairing.partner_text(encoder, prompt, partners, set())[1]
        found = set()
        for name in used:
            loaded = groups.get(name) or load(name)
            if loaded:
                groups[name] = loaded
                found.add(name)
        return frozenset(found)

    images = [pairs_of(prompt) for prompt in p.all_prompts]
    hires = [pairs_of(prompt) for prompt in (getattr(p, "all_hr_prompts", None) or [])]
    if not groups:
        return None
    return Plan(mode, strengths, images, hires, groups)


def begin(p, plan: Plan) -> None:
    """Install this generation's adapters (and forget any a failed generation left behind)."""
    end()
    _active.append(GenerationAdapters(p, plan))


def end() -> None:
    while _active:
        _active.pop().close()


def current() -> GenerationAdapters | None:
    return _active[-1] if _active else None


def on_cfg_denoiser(params) -> None:
    session = current()
    if session is not None:
        session.on_cfg_denoiser(params)


def describe(mode: str, strengths: tuple[float, float]) -> str:
    return f"{mode}, {strengths[0]:g}, {strengths[1]:g}"


def parse(text: str) -> tuple[str, float, float] | None:
    """The mode and strengths of an infotext value written by ``describe``; None when it is not one."""
    parts = [part.strip() for part in text.split(",")]
    try:
        mode, pos, neg = parts[0], float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        return None
    return (mode, pos, neg) if mode in MODES else None
