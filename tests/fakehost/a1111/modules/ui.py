"""Stand-in for modules/ui.py: only the names extensions import from it."""
from __future__ import annotations

from modules.call_queue import wrap_gradio_call, wrap_gradio_gpu_call, wrap_queued_call  # noqa: F401
from modules.ui_common import create_refresh_button, folder_symbol, refresh_symbol  # noqa: F401
from modules.ui_components import FormRow, ToolButton  # noqa: F401

random_symbol = "\U0001f3b2\ufe0f"  # 🎲️


def setup_progressbar(*args, **kwargs):
    """A no-op kept by the webui for old extensions."""
