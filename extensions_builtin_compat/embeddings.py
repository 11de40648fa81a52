"""The webui's embeddings folder and database(s): where pairs are written, which names exist, which pairs
the webui knows (trained here or dropped into the folder by hand)."""
from __future__ import annotations

from pathlib import Path

from modules import shared

from dreamartist.config import fields
from dreamartist.errors import InputError
from dreamartist.fileops import recover_folder, walk_files
from dreamartist.names import negative_name
from dreamartist.pairfiles import EMBEDDING_EXTS, list_pairs, load_pair, load_state

from . import host

FIELD_NAMES = {f.name for f in fields()}
def embeddings_dir() -> Path:
    return Path(shared.cmd_opts.embeddings_dir)


def recover() -> None:
    """Finish or undo what a run that died mid-save left in the embeddings folder (run before the webui reads it)."""
    recover_folder(embeddings_dir())


def databases() -> list:
    """A1111: model_hijack.embedding_db. Forge (Neo too): one database per text engine of the loaded model (none
    before the first generation loads it)."""
    db = host.embedding_db()
    if db is not None:
        return [db]
    model = host.loaded_model()
    return [engine.embeddings for engine in host.text_engines(model)]


def refresh() -> None:
    """Reload from disk. A1111 is forced: it only notices the folder's own mtime changing. Forge's engine
    databases always reread, and their reload takes no arguments."""
    db = host.embedding_db()
    if db is not None:
        db.load_textual_inversion_embeddings(force_reload=True)
        return
    for engine_db in databases():
        engine_db.load_textual_inversion_embeddings()


def catch_up() -> None:
    """Read what the folder gained since the database last read it (a no-op when nothing changed). reForge reads
    it at its first generation only, not at model load as A1111 does, so until then it knows no pair."""
    db = host.embedding_db()
    if db is not None and host.loaded_model() is not None:
        db.load_textual_inversion_embeddings()


def known_names() -> list[str]:
    """Names usable in prompts now, in the database's order."""
    names: dict[str, None] = {}
    for db in databases():
        names.update(dict.fromkeys(db.word_embeddings))
    return list(names)


def existing_names() -> set[str]:
    """Every name a new pair could clash with: loaded, skipped (other model family), or a file not yet loaded."""
    names = set(known_names())
    for db in databases():
        names.update(getattr(db, "skipped_embeddings", {}))
    folder = embeddings_dir()
    if folder.is_dir():
        names.update(p.stem for p in walk_files(folder) if p.suffix.lower() in EMBEDDING_EXTS)
    return names


def partners() -> dict[str, str]:
    """NAME -> its partner for every loaded NAME whose NAME-neg is loaded too (names compared case-insensitively,
    as the webui's prompt matching does); the partner as the database spells it."""
    by_lower = {name.lower(): name for name in known_names()}
    return {name: by_lower[negative_name(name).lower()] for name in known_names()
            if negative_name(name).lower() in by_lower and not name.lower().endswith("-neg")}


def skipped_pairs() -> dict[str, tuple[int, int]]:
    """NAME -> (its width, the loaded model's) for every pair the webui skipped because it was made for another model
    family (an SD1/SD2 pair with an SDXL model loaded, or the other way round)."""
    found = {}
    for db in databases():
        skipped = {name.lower(): e for name, e in getattr(db, "skipped_embeddings", {}).items()}
        for key, embedding in skipped.items():
            if not key.endswith("-neg") and negative_name(key) in skipped:
                found[embedding.name] = (int(embedding.shape or 0), int(getattr(db, "expected_shape", -1)))
    return found


def saved_pairs() -> list[str]:
    """The positive names of the pairs in the embeddings folder, from the files (whether or not loaded yet)."""
    return sorted(list_pairs(embeddings_dir()), key=str.lower)


def saved_options(name: str) -> dict:
    """The training options pair ``name`` was last trained with (its resume state), or what its files record."""
    folder = embeddings_dir()
    try:
        state = load_state(folder, name)
        if state and isinstance(state.get("config"), dict):
            return {key: value for key, value in state["config"].items() if key in FIELD_NAMES}
        record = load_pair(folder, name)[0].pair
    except InputError:
        return {}
    if record is None:  # files of the original extension carry no record
        return {}
    return {"gamma": record.gamma or "3", "pos_len": record.pos_len, "neg_len": record.neg_len,
            "steps": record.total_steps}


def pairs() -> list[str]:
    """The positive names of the pairs the webui knows, sorted case-insensitively. Before Forge's text engines exist
    (Neo, original Forge: until a model loads), the pairs in the folder, which they read when it does."""
    catch_up()
    if not databases():
        return saved_pairs()
    return sorted(partners(), key=str.lower)
