"""A stand-in AUTOMATIC1111 / Forge webui host for tests; see README.md."""
from __future__ import annotations

from .host import FakeHost
from .variants import VARIANTS, Flags

__all__ = ["FakeHost", "Flags", "VARIANTS"]
