"""Run by the webui at every start: install only what the host lacks (normally nothing, silently).

The engine needs torch, safetensors, pillow, numpy, gradio and filelock (a dependency of torch), which every
supported webui already ships.
Nothing here names a version: re-pinning a package the host pins would break the host.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

# distribution name (what pip installs) -> module name (what find_spec looks for)
REQUIRED = {"torch": "torch", "safetensors": "safetensors", "pillow": "PIL", "numpy": "numpy", "gradio": "gradio",
            "filelock": "filelock"}


def missing_packages() -> list[str]:
    """Distribution names of the required packages that cannot be imported (nothing is imported here)."""
    return [dist for dist, module in REQUIRED.items() if importlib.util.find_spec(module) is None]


def install(packages: list[str]) -> None:
    """Install through the webui's launcher when present, so --skip-install and its index URL apply."""
    try:
        import launch
    except ImportError:
        launch = None
    if launch is not None and hasattr(launch, "run_pip"):
        for package in packages:
            launch.run_pip(f"install {package}", f"{package} for DreamArtist")
        return
    subprocess.check_call([sys.executable, "-m", "pip", "install", *packages])


if __name__ == "__main__":
    needed = missing_packages()
    if needed:
        install(needed)
