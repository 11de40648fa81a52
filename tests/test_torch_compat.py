"""The torch the webuis ship (2.0.1 in 1.6.0, 2.1.2 in 1.10.1) is older than the one these tests run on: every
torch name and keyword the webui-side code uses must exist there, and the core must run there.

Point ``DREAMARTIST_WEBUI_TORCH`` at Python interpreters that have that torch (plus numpy, pillow, safetensors,
filelock, pytest), separated by ':', to run both checks under them; docs/development.md says how to make them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_backend import TinyBackend
from torch_api import missing, project_files

from dreamartist.config import TrainConfig
from dreamartist.images import prepare_reference
from dreamartist.pairfiles import load_adapters, load_pair, load_state
from dreamartist.trainer import train

ROOT = Path(__file__).resolve().parents[1]
PURE_TORCH_TESTS = ["tests/test_torch_compat.py", "tests/test_pairfiles.py", "tests/test_prompts.py",
                    "tests/test_config.py", "tests/test_templates.py", "tests/test_objective.py"]


def test_the_checker_finds_newer_names_and_keywords_and_respects_guards(tmp_path):
    code = tmp_path / "uses.py"
    code.write_text(
        "import torch\nimport torch.nn.functional as F\n"
        "torch.no_such_function(1)\nF.no_such_loss(1)\ntorch.nn.utils.clip_grad_norm_([], 1.0, no_such_keyword=1)\n"
        "if hasattr(torch, 'guarded_name'):\n    torch.guarded_name()\n"
        "scaler = torch.other_guarded() if hasattr(torch, 'other_guarded') else torch.cuda.amp.GradScaler()\n")
    assert missing([code]) == ["torch.nn.functional.no_such_loss (torch has torch.nn.functional but not the rest)",
                               "torch.no_such_function (torch has torch but not the rest)",
                               "torch.nn.utils.clip_grad_norm_(no_such_keyword=...)"]


def test_every_torch_name_the_webui_side_uses_exists_in_this_torch():
    assert missing(project_files()) == []


def test_the_training_loop_saves_and_resumes_on_plain_torch(tmp_path):
    """The loop, the optimiser state and the files with no diffusers or transformers: what runs in a webui."""
    image = Image.new("RGB", (64, 64), (200, 60, 30))
    references = [prepare_reference(image, 64, 64)]
    config = TrainConfig(name="walle", steps=2, width=64, height=64, init_words="abc", template="a [name]")
    result = train(TinyBackend(), config, references, tmp_path)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    resumed = train(TinyBackend(), config.replace(steps=4, resume=True, adapters=True), references, tmp_path)
    pos, neg = load_pair(tmp_path, "walle")
    assert resumed.step == pos.step == neg.step == 4 and load_state(tmp_path, "walle")["step"] == 4
    saved = load_adapters(tmp_path, "walle")
    assert sorted(saved) == ["te_neg", "te_pos", "unet_neg", "unet_pos"]
    assert all(t.abs().sum() > 0 for key, t in saved["unet_pos"].items() if key.endswith("lora_up"))  # trained


def _webui_interpreters() -> list[str]:
    return [p for p in os.environ.get("DREAMARTIST_WEBUI_TORCH", "").split(":") if p]


@pytest.mark.skipif(not _webui_interpreters(), reason="set DREAMARTIST_WEBUI_TORCH to interpreters with the "
                                                      "webuis' torch (docs/development.md) to run this check")
@pytest.mark.parametrize("python", _webui_interpreters() or ["none"])
def test_under_the_webuis_own_torch(python):
    names = subprocess.run([python, "tests/torch_api.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert names.returncode == 0, names.stdout + names.stderr
    env = {**os.environ, "DREAMARTIST_WEBUI_TORCH": ""}  # no recursion
    tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PURE_TORCH_TESTS], cwd=ROOT,
                           capture_output=True, text=True, timeout=900, env=env)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    print(f"{python}: {names.stdout.strip()}; {tests.stdout.strip().splitlines()[-1]}", file=sys.stderr)
