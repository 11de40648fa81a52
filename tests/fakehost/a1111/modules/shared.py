"""modules.shared: opts, cmd_opts, state, the lazy sd_model property and friends."""
from __future__ import annotations

import sys

from modules import devices, shared_items, shared_state
from modules.options import OptionInfo, Options, options_section  # noqa: F401 (re-exported like the webui)
from modules.shared_cmd_options import cmd_opts  # noqa: F401
from modules.shared_options import options_templates, restricted_opts

sys.modules[__name__].__class__ = shared_items.Shared

opts = Options(options_templates, restricted_opts)
state = shared_state.State()
device = devices.device
parallel_processing_allowed = True
demo = None
hide_dirs = {"visible": False}
