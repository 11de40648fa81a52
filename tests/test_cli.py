"""The command line as a user meets it: every bad input gets one line on stderr and leaves no file."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fakehost.checks import listing
from PIL import Image
from safetensors.torch import save_file

from dreamartist import fileops
from dreamartist.cli import build_parser, main
from dreamartist.fileops import pair_lock

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(path)
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def test_train_on_the_toy_model_writes_the_pair_and_previews_apart(photo, tmp_path, capsys):
    out, previews = tmp_path / "emb", tmp_path / "previews"
    code, stdout, err = run(["train", "--image", photo, "--name", "walle", "--out", out, "--previews", previews,
                             "--preview-every", "1", *FAST], capsys)
    assert code == 0
    assert "toy-world model" in stdout.splitlines()[0]
    assert listing(out) == ["walle-neg.pt", "walle.dreamartist-state", "walle.pt"]
    assert sorted(p.name for p in previews.iterdir()) == ["walle-final.png", "walle-step00001.png",
                                                          "walle-step00002.png"]
    assert "preview" in err  # the final preview has its own progress bar
    code, stdout, _ = run(["info", out / "walle.pt"], capsys)
    assert code == 0 and "partner walle-neg" in stdout


def test_the_final_preview_can_be_skipped(photo, tmp_path, capsys):
    code, _, _ = run(["train", "--image", photo, "--name", "walle", "--out", tmp_path / "emb", "--previews",
                      tmp_path / "p", "--no-final-preview", *FAST], capsys)
    assert code == 0 and not (tmp_path / "p").exists()


def write_image(path: Path, mode: str) -> tuple[Path, np.ndarray]:
    """An image file in ``mode`` and the RGB pixels (0..255) training must see: a green field whose left half
    is transparent (white) where the mode has transparency, a ramp for 16-bit grey."""
    if mode == "I;16":
        ramp = np.linspace(0, 65535, 64, dtype=np.uint16)
        Image.fromarray(np.tile(ramp, (64, 1))).save(path)
        return path, np.repeat((np.tile(ramp, (64, 1)) / 257.0)[..., None], 3, axis=2)
    rgb = np.full((64, 64, 3), (10, 200, 30), dtype=np.float64)
    image = Image.new("RGBA", (64, 64), (10, 200, 30, 255))
    if mode in ("RGBA", "LA", "P"):
        image.paste((0, 0, 0, 0), (0, 0, 32, 64))
        rgb[:, :32] = 255
    if mode in ("L", "LA"):
        rgb[:, 32 if mode == "LA" else 0:] = 0.299 * 10 + 0.587 * 200 + 0.114 * 30  # ITU-R 601 luma, as Pillow
    converted = image.convert(mode) if mode != "P" else image.convert("RGBA").quantize(dither=Image.Dither.NONE)
    if mode == "P":  # keep the fully transparent entry transparent
        converted.info["transparency"] = converted.getpixel((0, 0))
    converted.save(path)
    return path, rgb


@pytest.mark.parametrize("mode,suffix,tolerance", [("CMYK", ".jpg", 6), ("I;16", ".png", 1), ("RGBA", ".png", 1),
                                                   ("P", ".png", 1), ("LA", ".png", 1), ("L", ".webp", 6)])
def test_unusual_image_modes_reach_training_as_the_right_pixels(mode, suffix, tolerance, tmp_path, capsys,
                                                               monkeypatch):
    from dreamartist.trainer import Trainer

    seen, original = [], Trainer.__init__
    monkeypatch.setattr(Trainer, "__init__", lambda self, backend, config, refs, *a, **k: seen.append(refs) or
                        original(self, backend, config, refs, *a, **k))
    image, expected = write_image(tmp_path / f"ref{suffix}", mode)
    code, _, err = run(["train", "--image", image, "--name", "x", "--out", tmp_path / "e", *FAST], capsys)
    assert code == 0, err
    pixels = (seen[0][0].pixels.permute(1, 2, 0).numpy() + 1) * 127.5  # (64, 64, 3) back in 0..255
    assert np.abs(pixels - expected).mean() < tolerance, mode


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
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def test_existing_pair_is_not_overwritten(photo, tmp_path, capsys):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "walle.pt").write_bytes(b"keep me")
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", out, *FAST], capsys)
    assert_one_line_error(code, err, "walle.pt", "overwriting")
    assert (out / "walle.pt").read_bytes() == b"keep me" and listing(out) == ["walle.pt"]


def test_generate_pairs_automatically(photo, tmp_path, capsys):
    out = tmp_path / "emb"
    assert run(["train", "--image", photo, "--name", "walle", "--out", out, *FAST], capsys)[0] == 0
    image = tmp_path / "gen.png"
    code, stdout, err = run(["generate", "--prompt", "a photo of (walle:1.1)", "--embeddings", out, "--steps", "3",
                             "--width", "64", "--height", "64", "--output", image], capsys)
    assert code == 0, err
    assert "negative prompt: (walle-neg:1.1)" in stdout and "sampling" in err
    written = Image.open(image)
    assert written.size == (64, 64)
    prompt, negative, parameters = written.text["parameters"].splitlines()  # what the webui's PNG Info reads
    assert (prompt, negative) == ("a photo of (walle:1.1)", "Negative prompt: (walle-neg:1.1)")
    assert re.fullmatch(r"Steps: 3, Sampler: DDIM, CFG scale: 7, Seed: 0, Size: 64x64, Model hash: [0-9a-f]{10}, "
                        r"Model: toyworld, DreamArtist: walle", parameters), parameters


def test_module_entry_point_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dreamartist", "train", "--image", str(tmp_path / "none.png"),
                             "--name", "a"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def generate_cases(tmp_path: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    base = ["generate", "--prompt", "walle", "--steps", "2", "--width", "64", "--height", "64"]
    return {
        "unknown extension": ([*base, "--output", tmp_path / "x.gif"], ("x.gif", ".png")),
        "missing embeddings folder": ([*base, "--embeddings", tmp_path / "nowhere", "--output", tmp_path / "x.png"],
                                      ("nowhere", "not a folder")),
        "bad cfg": ([*base, "--cfg", "lots", "--output", tmp_path / "x.png"], ("Gamma",)),
        "output under a file": ([*base, "--output", tmp_path / "afile" / "x.png"], ("afile",)),
    }


@pytest.mark.parametrize("case", ["unknown extension", "missing embeddings folder", "bad cfg",
                                  "output under a file"])
def test_generate_checks_its_arguments_before_loading_a_model(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.setattr("dreamartist.cli._load_backend", lambda ckpt: pytest.fail("the model was loaded"))
    args, fragments = generate_cases(tmp_path)[case]
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "x.png").exists()


def test_an_unwritable_output_folder_is_found_before_the_model_loads(photo, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.setattr("dreamartist.cli._load_backend", lambda ckpt: pytest.fail("the model was loaded"))
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", tmp_path / "afile" / "emb", *FAST],
                       capsys)
    assert_one_line_error(code, err, "cannot be created")
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", tmp_path / "emb", "--previews",
                        tmp_path / "emb" / "shots", *FAST], capsys)
    assert_one_line_error(code, err, "inside --out")


def test_a_full_disk_keeps_the_last_good_pair_and_says_where(photo, tmp_path, capsys, monkeypatch):
    real, saves = fileops.write_temp, []

    def filling_up(folder, name, payload):
        saves.append(name)
        if len([n for n in saves if n != "probe"]) > 4:  # full after the first save: three files and its journal
            raise OSError(28, "No space left on device")
        return real(folder, name, payload)

    monkeypatch.setattr(fileops, "write_temp", filling_up)  # every save writes through it
    out = tmp_path / "emb"
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", out, "--save-every", "1",
                        "--steps", "3", "--width", "64", "--height", "64"], capsys)
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and last.startswith("dreamartist: error: Saving failed at step 2 (No space left on device)")
    assert "last good pair (step 1) is walle.pt and walle-neg.pt in " + str(out) in last
    assert pairfiles_step(out) == 1 and listing(out) == ["walle-neg.pt", "walle.dreamartist-state", "walle.pt"]


def pairfiles_step(folder: Path) -> int:
    from dreamartist.pairfiles import load_pair

    pos, neg = load_pair(folder, "walle")
    assert pos.step == neg.step
    return pos.step


def test_the_first_ctrl_c_stops_after_the_step_and_saves(photo, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from dreamartist.trainer import Trainer

    real, calls = Trainer._optimizer_step, []

    def step_then_interrupt(self):
        calls.append(1)
        loss = real(self)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the step: the step still completes
        return loss

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_interrupt)
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", tmp_path / "emb",
                        "--steps", "10", "--width", "64", "--height", "64"], capsys)
    assert code == 130 and "stopping after this step" in err
    assert pairfiles_step(tmp_path / "emb") == 2


def test_a_second_run_of_the_same_name_is_refused_at_once(photo, tmp_path, capsys):
    out = tmp_path / "emb"
    with pair_lock(out, "Walle"):
        code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", out, *FAST], capsys)
    assert_one_line_error(code, err, "Another training of walle")
    assert listing(out) == []


def test_resume_honours_changed_options_and_refuses_a_changed_length(photo, tmp_path, capsys):
    import torch

    out = tmp_path / "emb"
    common = ["train", "--image", photo, "--name", "walle", "--out", out, "--no-final-preview", "--width", "64",
              "--height", "64"]
    assert run([*common, "--steps", "2"], capsys)[0] == 0
    assert run([*common, "--steps", "3", "--resume", "--lr", "0.01", "--beta1", "0.5"], capsys)[0] == 0
    state = torch.load(out / "walle.dreamartist-state", weights_only=True)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert state["step"] == 3 and groups["pos_words"]["lr"] == 0.01 and groups["pos_words"]["betas"][0] == 0.5
    code, _, err = run([*common, "--steps", "4", "--resume", "--pos-len", "5"], capsys)
    assert_one_line_error(code, err, "S^p has 3 vectors", "set it to 3")


@pytest.mark.parametrize("args, fragment", [
    (["--gamma", "1e15"], "at most 30"), (["--lr", "5"], "Learning rate"), (["--grad-clip", "1e9"], "clip"),
    (["--mask", "BLACK"], "black everywhere"), (["--mask", "CLEAR"], "transparent everywhere")])
def test_out_of_range_options_and_empty_masks_are_refused(photo, tmp_path, capsys, args, fragment):
    masks = {"BLACK": tmp_path / "black.png", "CLEAR": tmp_path / "clear.png"}
    Image.new("L", (64, 64), 0).save(masks["BLACK"])
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(masks["CLEAR"])  # over white it would read as all white
    args = [str(masks.get(a, a)) for a in args]
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", tmp_path / "emb", *FAST, *args],
                       capsys)
    assert_one_line_error(code, err, fragment)
    assert listing(tmp_path / "emb") == []


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            assert "(default: )" not in action.help and "(default: None)" not in action.help


def test_adapters_train_with_the_pair_act_in_generate_and_export_as_a_lora(photo, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "emb"
    train = ["train", "--image", photo, "--name", "walle", "--out", out, "--adapters", "--no-final-preview",
             "--unet-lr-pos", "0.01", "--unet-lr-neg", "0.01", *FAST]
    assert run(train, capsys)[0] == 0
    assert listing(out) == ["walle-neg.pt", "walle.dreamartist-lora", "walle.dreamartist-state", "walle.pt"]

    def generate(prompt: str, mode: str, name: str) -> Image.Image:
        image = tmp_path / f"{name}.png"
        code, _, err = run(["generate", "--prompt", prompt, "--embeddings", out, "--steps", "2", "--width", "64",
                            "--height", "64", "--adapters", mode, "--output", image], capsys)
        assert code == 0, err
        return Image.open(image)

    on, off, da = generate("walle", "pair", "on"), generate("walle", "off", "off"), generate("walle", "DA++", "da")
    assert not np.array_equal(np.asarray(on), np.asarray(off))
    assert 'DreamArtist adapters: "pair, 0.8, 0.65"' in on.text["parameters"]
    assert "Negative prompt: walle-neg\n" in on.text["parameters"] and "Negative prompt: \n" in da.text["parameters"]
    cat, cat_off = generate("a cat", "pair", "cat"), generate("a cat", "off", "cat_off")
    assert np.array_equal(np.asarray(cat), np.asarray(cat_off))  # a prompt without NAME is untouched

    lora = tmp_path / "walle-pos.safetensors"
    code, stdout, _ = run(["export-lora", "--name", "walle", "--embeddings", out, "--output", lora], capsys)
    assert code == 0 and "<lora:walle-pos:1> walle" in stdout
    assert lora.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # readable as any other file the user writes
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with safe_open(str(lora), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        down = f.get_tensor("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight")
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert not any("neg" in key for key in keys)  # phi^n is never an ordinary LoRA
    assert {k.rsplit(".", 2)[0] for k in keys if k.endswith(".alpha")} == {k.rsplit(".", 2)[0] for k in keys}
    assert down.shape[0] >= 1 and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)


def test_a_mask_trains_on_the_toy_model_whose_latent_cell_is_four_pixels(photo, tmp_path, capsys):
    """The mask is averaged down to the model's own latent grid (16x16 at 64 px here, not SD's 8x8)."""
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 128).save(mask)
    code, stdout, err = run(["train", "--image", photo, "--mask", str(mask), "--name", "walle",
                             "--out", tmp_path / "emb", *FAST], capsys)
    assert code == 0, err
    assert (tmp_path / "emb" / "walle.pt").exists()


def test_resuming_a_pair_that_does_not_exist_makes_nothing(photo, tmp_path, capsys):
    code, _, err = run(["train", "--image", photo, "--name", "walle", "--out", tmp_path / "new" / "emb", *FAST,
                        "--resume"], capsys)
    assert_one_line_error(code, err, "no pair walle to resume")
    assert not (tmp_path / "new").exists()
