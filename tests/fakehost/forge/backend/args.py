"""backend.args: dynamic_args, through which the text engines hand "Emphasis"/"TI" to the next infotext."""
from __future__ import annotations

import types

dynamic_args = types.SimpleNamespace(last_extra_generation_params={}, embedding_dir=None)
