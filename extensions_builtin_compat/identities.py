"""Identities (identity mode) in the webui: their folder, the names in it, each file read once per version.

They live in ``models/dreamartist-identities``, outside the embeddings folder, whose loader would read each
``.safetensors`` there as a broken embedding and log an error for it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dreamartist import identityfiles
from dreamartist.config import IdentityConfig
from dreamartist.errors import InputError
from dreamartist.fileops import recover_folder
from dreamartist.pairfiles import load_state

FOLDER = "dreamartist-identities"
_cache: dict[Path, tuple[float, identityfiles.IdentityFile]] = {}


def identities_dir() -> Path:
    from modules import paths_internal

    return Path(paths_internal.models_path) / FOLDER


def recover() -> None:
    """Finish or undo what a run that died mid-save left in the folder."""
    if identities_dir().is_dir():
        recover_folder(identities_dir())


def names() -> dict[str, Path]:
    """Identity name -> file, as the folder holds them now."""
    return identityfiles.list_identities(identities_dir())


def load(path: Path) -> identityfiles.IdentityFile:
    """The identity in ``path``, read again only when the file changed."""
    mtime = os.path.getmtime(path)
    if path not in _cache or _cache[path][0] != mtime:
        _cache[path] = (mtime, identityfiles.load_identity(path))
    return _cache[path][1]


def saved_names() -> list[str]:
    """The identities in the folder, sorted case-insensitively."""
    return sorted(names(), key=str.lower)


def saved_options(name: str) -> dict:
    """The options identity ``name`` was last trained with (its resume state); {} when it has none."""
    try:
        state = load_state(identities_dir(), name)
    except InputError:
        return {}
    config = state.get("config") if state else None
    known = {f.name for f in dataclasses.fields(IdentityConfig)}
    return {key: value for key, value in config.items() if key in known} if isinstance(config, dict) else {}
