"""Names of pairs: what a user may call a concept, and how its two files are named."""
from __future__ import annotations

import re

from .errors import InputError

NEG_SUFFIX = "-neg"
_ALLOWED = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a pair, else raise InputError saying why.

    A name becomes a file name in the embeddings folder and a word in prompts, so it may hold letters,
    digits, '_', '-', '.', ' ' only, must not start with '.', '-' or a space, and must not end in '-neg'
    (that is the partner's name).
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError("The name is empty: give the word you will type in prompts, e.g. 'walle'.")
    if name != name.strip():
        raise InputError(f"The name {name!r} starts or ends with a space.")
    if "/" in name or "\\" in name or ".." in name or "\0" in name:
        raise InputError(f"The name {name!r} must not contain path separators or '..'.")
    if not _ALLOWED.match(name):
        raise InputError(f"The name {name!r} may use only letters, digits, '_', '-', '.' and spaces, "
                         "and must start with a letter, digit or '_'.")
    if len(name) > 100:
        raise InputError("The name is longer than 100 characters.")
    if name.lower().endswith(NEG_SUFFIX):
        raise InputError(f"The name {name!r} ends in '{NEG_SUFFIX}', which is reserved for the negative partner.")
    if name.lower().split(".")[0] in _WINDOWS_RESERVED:
        raise InputError(f"The name {name!r} is reserved on Windows.")
    return name


def negative_name(name: str) -> str:
    return name + NEG_SUFFIX
