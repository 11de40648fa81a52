"""The command line as a user meets it: every bad input gets one line on stderr and leaves no file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dreamartist.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(path)
    return path


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamartist: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_on_the_demo_model_writes_the_pair_and_a_preview(photo, tmp_path, capsys):
    out = tmp_path / "emb"
    code, stdout, _ = run(["train", "--image", photo, "--name", "walle", "--out", out, *FAST], capsys)
    assert code == 0
    assert "demo model" in stdout.splitlines()[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "walle-neg.pt", "walle-preview.png", "walle.dreamartist-state", "walle.pt"]
    code, stdout, _ = run(["info", out / "walle.pt"], capsys)
    assert code == 0 and "partner walle-neg" in stdout


def write_image(path: Path, mode: str) -> Path:
    if mode == "I;16":
        Image.fromarray(np.linspace(0, 65535, 64 * 64, dtype=np.uint16).reshape(64, 64)).save(path)
        return path
    image = Image.new("RGB", (64, 64), (10, 200, 30)).convert(mode)
    image.save(path)
    return path


@pytest.mark.parametrize("mode,suffix", [("CMYK", ".jpg"), ("I;16", ".png"), ("RGBA", ".png"), ("P", ".png"),
                                         ("LA", ".png"), ("L", ".webp")])
def test_unusual_image_modes_simply_work(mode, suffix, tmp_path, capsys):
    image = write_image(tmp_path / f"ref{suffix}", mode)
    code, _, err = run(["train", "--image", image, "--name", "x", "--out", tmp_path / "e", *FAST], capsys)
    assert code == 0, err


def bad_inputs(tmp_path: Path, photo: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(photo.read_bytes()[:200])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, sdxl)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00garbage" * 10)
    train = ["train", "--out", tmp_path / "out", *FAST]
    return {
        "not an image": ([*train, "--image", text, "--name", "a"], ("notes.png",)),
        "truncated": ([*train, "--image", truncated, "--name", "a"], ("cut.png",)),
        "1x1": ([*train, "--image", tiny, "--name", "a"], ("tiny.png",)),
        "missing image": ([*train, "--image", tmp_path / "nope.png", "--name", "a"], ("nope.png",)),
        "missing checkpoint": ([*train, "--image", photo, "--name", "a", "--ckpt", tmp_path / "m.safetensors"],
                               ("m.safetensors",)),
        "garbage checkpoint": ([*train, "--image", photo, "--name", "a", "--ckpt", garbage], ("garbage.ckpt",)),
        "sdxl": ([*train, "--image", photo, "--name", "a", "--ckpt", sdxl], ("SDXL",)),
        "zero steps": (["train", "--out", tmp_path / "out", "--image", photo, "--name", "a", "--steps", "0"],
                       ("Steps",)),
        "negative steps": (["train", "--out", tmp_path / "out", "--image", photo, "--name", "a", "--steps", "-3"],
                           ("Steps",)),
        "bad gamma": ([*train, "--image", photo, "--name", "a", "--gamma", "2-4:__import__"], ("Gamma",)),
        "traversal": ([*train, "--image", photo, "--name", "../../etc/x"], ("path",)),
        "reserved suffix": ([*train, "--image", photo, "--name", "cat-neg"], ("-neg",)),
        "empty name": ([*train, "--image", photo, "--name", ""], ("empty",)),
        "missing name": ([*train, "--image", photo], ("--name",)),
        "steps not a number": ([*train, "--image", photo, "--name", "a", "--steps", "many"], ("steps",)),
    }


CASES = ["not an image", "truncated", "1x1", "missing image", "missing checkpoint", "garbage checkpoint", "sdxl",
         "zero steps", "negative steps", "bad gamma", "traversal", "reserved suffix", "empty name", "missing name",
         "steps not a number"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_clear_line_and_writes_nothing(case, tmp_path, photo, capsys):
    args, fragments = bad_inputs(tmp_path, photo)[case]
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_pair_is_not_overwritten(photo, tmp_path, capsys):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "walle.pt").write_bytes(b"keep me")
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", out, *FAST], capsys)
    assert_one_line_error(code, err, "walle.pt", "Overwrite")
    assert (out / "walle.pt").read_bytes() == b"keep me" and sorted(p.name for p in out.iterdir()) == ["walle.pt"]


def test_generate_pairs_automatically(photo, tmp_path, capsys):
    out = tmp_path / "emb"
    assert run(["train", "--image", photo, "--name", "walle", "--out", out, *FAST], capsys)[0] == 0
    image = tmp_path / "gen.png"
    code, stdout, err = run(["generate", "--prompt", "a photo of (walle:1.1)", "--embeddings", out, "--steps", "3",
                             "--width", "64", "--height", "64", "--output", image], capsys)
    assert code == 0, err
    assert "negative prompt: (walle-neg:1.1)" in stdout
    assert Image.open(image).size == (64, 64)


def test_module_entry_point_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dreamartist", "train", "--image", str(tmp_path / "none.png"),
                             "--name", "a"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
