"""Attributes changed for a with-block and put back after it exactly as they were: the one way this project
patches an object it does not own (an instance ``forward``, a host's flag, a module's function)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

_MISSING = object()


@contextlib.contextmanager
def attributes_restored(targets: Iterable[tuple[object, str]]) -> Iterator[None]:
    """On exit (also on error), each ``(owner, name)`` is as it was on entry: the owner's own value set back, or,
    where it had none of its own and its class's showed through, whatever the with-block set removed again."""
    saved = [(owner, name, vars(owner).get(name, _MISSING)) for owner, name in targets]
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is _MISSING:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, value)
