"""Identity mode at generation time (webui 1.6-1.10 and the Forge family; SD 1.x, 2.x and SDXL): a prompt that names
an identity gets, in every UNet call of the rows that hold it, the K variant of the call's stage as its context and
the V variant as the values of every cross-attention; other rows and other prompts are untouched.

How, for one generation (``begin`` in the script's ``process``, ``end`` in ``postprocess``):
- Each identity the prompts name is registered as a one-vector embedding (a carrier, its stage-0 K token), so the
  host's prompt parser gives it one token, weights, prompt editing and AND as for any embedding (in the webui's
  database, or in each of Forge Neo's text engines').
- The prompt encode's output for a batch of texts that name identities is followed by the same texts encoded with
  the carrier swapped to each stage's K and V token (2 encodes per stage pattern), kept beside the carrier rows.
  SDXL's conditioner takes a dict (the texts under "txt", the size conditioning beside them) and gives one
  ("crossattn", and "vector": CLIP-G's pooled output and the size embedding); its rows are re-encoded with their
  own size conditioning, and the K variant's vector is kept too, since training conditions on the K prompt's
  pooled output.
- A forward pre-hook on the diffusion model finds, by value, the context rows that begin with a carrier row (the
  denoiser may pad a row after it, or repeat it up to a longer row's length as the Forge family does; for SDXL the
  row's vector must match too, so that a hires pass, whose texts are the same at another size, finds its own),
  reads the call's timesteps, swaps in the K variant of each row's stage in every copy (and its vector) and parks
  the V variants for the cross-attentions (host_attention's control: every attention optimisation keeps working).
Every batching of cond and uncond rows works unchanged (rows are matched by value, not by position), and so do the
hires pass and img2img, whose conds go through the same encoder. The cached conds of the generation are dropped at
its start, so that the encoder runs while the hooks are there. A generation that fails before ``postprocess`` still
closes its processing object (the webui's txt2img, img2img and API all do, with ``contextlib.closing``): its
``close`` ends the hooks too.
"""
from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch

from dreamartist import identityfiles
from dreamartist.attention_control import Calls
from dreamartist.errors import InputError
from dreamartist.identity import IdentityTokens, K, V, stage_bounds, stage_of
from dreamartist.identity_control import IdentityControl

from . import embeddings, host_pairing, identities, identity_text, jobs
from .host_attention import ldm_control
from .host_backend import embeddings_registered, text_encoders, timestep_count, token_widths, unet_of

INFOTEXT_KEY = "DreamArtist identity"
UNET_ARGUMENTS = ("x", "timesteps", "context", "y")  # ldm's, sgm's and the Forge family's UNet forward
log = logging.getLogger("dreamartist")
_active: list[GenerationIdentities] = []


def _stage_patterns(tokens: list[IdentityTokens], timesteps: int) -> list[tuple[int, ...]]:
    """Every combination of stages the identities take together over t in [0, T)."""
    starts = sorted({b for t in tokens for b in stage_bounds(t.stages, timesteps)[:-1]})
    return list(dict.fromkeys(tuple(int(stage_of(s, t.stages, timesteps)) for t in tokens) for s in starts))


class GenerationIdentities:
    """The hooks of one generation; ``close`` removes them all."""

    def __init__(self, p, found: dict[str, IdentityTokens]):
        model = p.sd_model
        self.model = model
        self.prompts = host_pairing.prompt_encoder(model)
        self.timesteps = timestep_count(model)
        self.keys = tuple(text_encoders(model))
        self.tokens = found
        self.control = IdentityControl()
        self.entries: list[Entry] = []
        self.busy = False
        self.stack = contextlib.ExitStack()
        self.carriers = {name: identity_text.carrier(model, name, self._vec(tokens.vectors(0, K)))
                         for name, tokens in found.items()}
        self.stack.enter_context(embeddings_registered(model, self.carriers))
        unet = unet_of(model)
        self.stack.enter_context(ldm_control(unet, self.control, Calls()))
        self.stack.enter_context(identity_text.encodes_watched(model, self._encoded))
        handles = (unet.register_forward_pre_hook(self._before_unet, with_kwargs=True),
                   unet.register_forward_hook(self._after_unet))
        self.stack.callback(lambda: [h.remove() for h in handles])

    def _vec(self, vectors: dict[str, torch.Tensor]):
        """An Embedding's ``vec`` of one-vector tokens: the tensor (SD1/SD2), or a dict per encoder key (SDXL)."""
        return vectors[self.keys[0]] if len(self.keys) == 1 else dict(vectors)

    # -- the text encoder ------------------------------------------------------------------------------
    def _encoded(self, batch, output, encode):
        texts = batch["txt"] if isinstance(batch, dict) else batch
        if self.busy or getattr(texts, "is_negative_prompt", False):  # identities act on the cond rows only
            return
        texts = list(texts)
        named = [tuple(host_pairing.names_in(self.prompts, text, list(self.tokens))) for text in texts]
        rows = [i for i, names in enumerate(named) if names]
        if not rows:
            return
        self.busy = True
        try:
            for i in rows:
                names = named[i]
                variants = {}
                for pattern in _stage_patterns([self.tokens[n] for n in names], self.timesteps):
                    encoded = {}
                    for which in (K, V):
                        for name, stage in zip(names, pattern):
                            self.carriers[name].vec = self._vec(self.tokens[name].vectors(stage, which))
                        encoded[which] = _row(encode(_one_row(batch, i)), 0)
                    variants[pattern] = (encoded[K][0], encoded[V][0], encoded[K][1])
                self.entries.append(Entry(*_row(output, i), names, variants))
        finally:
            for name, carrier in self.carriers.items():
                carrier.vec = self._vec(self.tokens[name].vectors(0, K))
            self.busy = False

    # -- the UNet ----------------------------------------------------------------------------------------
    def _before_unet(self, module, args, kwargs):
        timesteps, context, y = (kwargs.get(name, args[i] if len(args) > i else None)
                                 for i, name in enumerate(UNET_ARGUMENTS) if i)
        if context is None or timesteps is None or not self.entries:
            return None
        keys, values, ys, changed = context.clone(), context.clone(), None if y is None else y.clone(), False
        for row in range(context.shape[0]):
            entry = self._entry_of(context[row], None if y is None else y[row])
            if entry is None:
                continue
            t = timesteps[row] if timesteps.ndim else timesteps
            pattern = tuple(int(stage_of(t, self.tokens[n].stages, self.timesteps)) for n in entry.names)
            k, v, k_vector = entry.variants[pattern]
            for span in _copies(context[row], entry.context):
                keys[row, span], values[row, span] = k.to(context.dtype), v.to(context.dtype)
            if ys is not None and k_vector is not None:
                ys[row] = k_vector.to(ys.dtype)
            changed = True
        if not changed:
            return None
        self._call = self.control.call(values=values)
        self._call.__enter__()
        args, kwargs = list(args), dict(kwargs)
        for i, value in ((2, keys), (3, ys)):
            if value is None:
                continue
            if UNET_ARGUMENTS[i] in kwargs or i >= len(args):
                kwargs[UNET_ARGUMENTS[i]] = value
            else:
                args[i] = value
        return tuple(args), kwargs

    def _entry_of(self, row: torch.Tensor, vector: torch.Tensor | None) -> Entry | None:
        for entry in self.entries:
            base = entry.context
            if base.shape[0] > row.shape[0] or not torch.equal(row[:base.shape[0]], base.to(row.dtype)):
                continue
            if vector is None or entry.vector is None or torch.equal(vector, entry.vector.to(vector.dtype)):
                return entry
        return None

    def _after_unet(self, module, args, output):
        call = getattr(self, "_call", None)
        if call is not None:
            self._call = None
            call.__exit__(None, None, None)

    def close(self) -> None:
        self._after_unet(None, None, None)
        self.stack.close()


class Entry(NamedTuple):
    """A cond row that names identities, as the encoder gave it, and its variants per stage pattern."""

    context: torch.Tensor  # (tokens, dim)
    vector: torch.Tensor | None  # SDXL's "vector" row
    names: tuple[str, ...]
    variants: dict  # stage pattern -> (K context, V context, K vector or None)


def _copies(row: torch.Tensor, base: torch.Tensor) -> list[slice]:
    """Where ``row`` holds the encoded ``base``: at its start, then every further copy of it (the Forge family's
    batching repeats a shorter row up to the longest one's length; AUTOMATIC1111's pads it with other tokens)."""
    tokens = base.shape[0]
    spans = [slice(start, start + tokens) for start in range(0, row.shape[0] - tokens + 1, tokens)]
    return [span for i, span in enumerate(spans) if i == 0 or torch.equal(row[span], base.to(row.dtype))]


def _one_row(batch, i: int):
    """Row ``i`` of the encoder's input: a list of texts (the webui's SdConditioning keeps its size and negative
    flags, which Forge's SDXL conditioning reads), or SDXL's dict of texts and size tensors."""
    from modules.prompt_parser import SdConditioning

    if isinstance(batch, dict):
        return {key: [value[i]] if key == "txt" else value[i:i + 1] for key, value in batch.items()}
    return SdConditioning([batch[i]], copy_from=batch) if isinstance(batch, SdConditioning) else [batch[i]]


def _row(output, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, vector or None) of row ``i`` of the encoder's output, detached."""
    if isinstance(output, dict):
        vector = output.get("vector")
        return output["crossattn"][i].detach(), None if vector is None else vector[i].detach()
    return output[i].detach(), None


def used_identities(p) -> dict[str, identityfiles.IdentityFile]:
    """The identities the generation's prompts name (not shadowed by an embedding of the same name)."""
    available = identities.names()
    if not available:
        return {}
    known = {n.lower() for n in embeddings.existing_names()}
    candidates = [name for name in available if name.lower() not in known]
    encoder = host_pairing.prompt_encoder(getattr(p, "sd_model", None))
    if encoder is None or not candidates:
        return {}
    prompts = list(dict.fromkeys((getattr(p, "all_prompts", None) or []) + (getattr(p, "all_hr_prompts", None) or [])))
    named = {name for prompt in prompts for name in host_pairing.names_in(encoder, prompt, candidates)}
    return {name: identities.load(available[name]) for name in sorted(named)}


def begin(p) -> None:
    """Install the hooks for the identities the prompts name (and forget any a failed generation left)."""
    end()
    found = used_identities(p)
    if not found:
        return
    try:
        widths = token_widths(p.sd_model)
        for f in found.values():
            identityfiles.check_compatible(f, widths)
    except InputError as e:
        note = f"DreamArtist: {', '.join(found)} not applied: {str(e).rstrip('.')}."
        log.warning(note)
        if hasattr(p, "comment"):
            p.comment(note)
        return
    device = next(unet_of(p.sd_model).parameters()).device
    tokens = {name: IdentityTokens({k: v.to(device) for k, v in f.tokens.tokens.items()}) for name, f in found.items()}
    jobs.reset_cond_caches()  # cached conds were encoded before the hooks; they must be encoded again
    _active.append(GenerationIdentities(p, tokens))
    close = p.close

    def close_and_end() -> None:  # also when the generation fails before postprocess
        end()
        close()

    p.close = close_and_end
    p.extra_generation_params[INFOTEXT_KEY] = ", ".join(found)


def end() -> None:
    while _active:
        _active.pop().close()
        jobs.reset_cond_caches()  # the cached conds hold the carriers


def current() -> GenerationIdentities | None:
    return _active[-1] if _active else None
