"""BARET edit in the webui's img2img: the webui registers the Script class it finds here (the logic lives in
extensions_builtin_compat.baret_script)."""
from __future__ import annotations

from extensions_builtin_compat.baret_script import BaretEditScript  # noqa: F401  (found by the webui's loader)
