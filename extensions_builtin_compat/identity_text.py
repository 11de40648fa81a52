"""Where identity mode meets the host's prompt encoding, for one generation: the carriers (one-vector embeddings an
identity's name stands for) in the host's own Embedding class, and a call after each prompt encode with the encode
itself, to encode rows again with other carrier values.

Two hosts' shapes: the webui's prompt encoder module (AUTOMATIC1111, reForge, Forge Classic: ``cond_stage_model``,
SDXL's conditioner), and Forge's own backend (Neo, original Forge: the model's ``get_learned_conditioning`` runs a
text engine per encoder).
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

from dreamartist.attributes import attributes_restored

from . import host

# (batch the host encoded, its output, the encode to call again with one row)
OnEncoded = Callable[[object, object, Callable], None]


def carrier(model, name: str, vec):
    """A one-vector Embedding of the host's own class over ``vec``: (1, dim), or SDXL's {key: (1, dim)}."""
    module = "backend.text_processing.textual_inversion" if host.runs_forge_engine(model) else \
        "modules.textual_inversion.textual_inversion"
    embedding = importlib.import_module(module).Embedding(vec, name)
    widths = [int(v.shape[-1]) for v in (vec.values() if isinstance(vec, dict) else [vec])]
    embedding.vectors, embedding.shape = 1, sum(widths)
    return embedding


def _engine_notes() -> dict:
    """What Forge's text engines note for the next generation's infotext (backend.args.dynamic_args)."""
    try:
        return importlib.import_module("backend.args").dynamic_args.last_extra_generation_params
    except (ImportError, AttributeError):
        return {}


@contextlib.contextmanager
def encodes_watched(model, on_encoded: OnEncoded) -> Iterator[None]:
    """``on_encoded`` after every prompt encode of ``model`` in the with-block: a forward hook on the webui's prompt
    encoder, or, on Forge's backend, the model's ``get_learned_conditioning`` wrapped for this instance."""
    if not host.runs_forge_engine(model):
        handle = model.cond_stage_model.register_forward_hook(
            lambda module, args, output: on_encoded(args[0], output, module))
        try:
            yield
        finally:
            handle.remove()
        return
    encode = model.get_learned_conditioning
    notes = _engine_notes()

    def watched(batch):
        output = encode(batch)
        noted = dict(notes)  # what the generation's own encode noted for its infotext ("TI", "Emphasis")
        on_encoded(batch, output, encode)
        notes.clear()  # not the encodes of its stage variants, each of which notes the carrier again
        notes.update(noted)
        return output

    with attributes_restored([(model, "get_learned_conditioning")]):
        model.get_learned_conditioning = watched
        yield
