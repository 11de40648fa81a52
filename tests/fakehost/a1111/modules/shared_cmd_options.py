"""modules.shared_cmd_options: the parsed command line, with the defaults of a CPU test run."""
from __future__ import annotations

import argparse
import os

from modules import paths_internal

cmd_opts = argparse.Namespace(
    data_dir=paths_internal.data_path,
    embeddings_dir=os.path.join(paths_internal.data_path, "embeddings"),
    textual_inversion_templates_dir=os.path.join(paths_internal.script_path, "textual_inversion_templates"),
    api=False, nowebui=False, listen=False, skip_install=False, disable_all_extensions=False,
    disable_extra_extensions=False, lowvram=False, medvram=False, medvram_sdxl=False, no_half=True,
    no_half_vae=True, upcast_sampling=False, precision="autocast", no_hashing=False, use_cpu=["all"],
    lora_dir=os.path.join(paths_internal.models_path, "Lora"),
)
