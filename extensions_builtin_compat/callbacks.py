"""Registering webui script callbacks on every version: the ``name=`` keyword exists only from 1.9."""
from __future__ import annotations

import inspect
from collections.abc import Callable


def name_kw(register: Callable, name: str) -> dict:
    """``{"name": name}`` when ``register`` (an ``on_*`` function) takes it, else ``{}`` (1.6-1.8 raise TypeError).

    The scripts file calls ``on_*`` itself, ``on_ui_tabs(fn, **name_kw(on_ui_tabs, "tab"))``, because the
    webui names a callback after the file that registers it.
    """
    try:
        parameters = inspect.signature(register).parameters
    except (TypeError, ValueError):
        return {}
    return {"name": name} if "name" in parameters else {}
