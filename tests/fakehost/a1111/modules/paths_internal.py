"""modules.paths_internal: the webui root and data folders (here: the test's temporary root)."""
from __future__ import annotations

import os

from modules._variant import ROOT

script_path = str(ROOT)
data_path = str(ROOT)
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
