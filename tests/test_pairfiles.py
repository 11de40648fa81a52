"""Pair files: what the webui reads, bit-exact round trips, safety, clashes, atomic writes, resume state."""
from __future__ import annotations

import os
import pickletools
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamartist import fileops
from dreamartist.errors import InputError, PairBusy
from dreamartist.families import family_of
from dreamartist.pairfiles import (
    PairMeta,
    check_compatible,
    find_clashes,
    list_pairs,
    load_embedding,
    load_pair,
    load_state,
    save_pair,
)

WEBUI_PT_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def webui_read(path: Path):
    """The webui's embedding reader (EmbeddingDatabase.load_from_file and its rules): returns (name, vec, step)."""
    ext = path.suffix.upper()
    if ext in (".PT", ".BIN"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif ext == ".SAFETENSORS":
        data = load_file(str(path), device="cpu")
    else:
        return None  # any other extension is skipped
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(torch.float32)
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(torch.float32) for k, v in data.items()}
    elif isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data.values()))
        vec = (vec.unsqueeze(0) if vec.ndim == 1 else vec).detach().to(torch.float32)
    else:
        raise ValueError(f"Couldn't identify {path.name} as neither textual inversion embedding nor diffuser concept.")
    return path.stem, vec, data.get("step")


def webui_safe_check(path: Path) -> None:
    """The checks of the webui's safe loader (modules/safe.py, oldest supported version): zip records and
    pickle globals."""
    allowed_records = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
    storages = ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
                "BFloat16Storage")
    allowed_globals = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
                       *(("torch", s) for s in storages)}  # the part of its allow-list tensors need
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert all(allowed_records.match(n) for n in names), names
        (pkl,) = [n for n in names if n.endswith("/data.pkl")]
        ops = list(pickletools.genops(z.read(pkl)))
    found = {tuple(arg.split(" ")) for op, arg, _ in ops if op.name == "GLOBAL"}
    assert found <= allowed_globals and not any(op.name == "STACK_GLOBAL" for op, _, _ in ops), found


def _vectors(n: int, width: int = 768, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    key = {768: "clip_l", 1024: "clip_h"}[width]
    return {key: torch.randn(n, width, generator=g)}


def _sdxl(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, 768, generator=g), "clip_g": torch.randn(n, 1280, generator=g)}


def _listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` but the work folder itself and its lock files (empty, kept)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name != fileops.WORK_DIR and p.suffix != ".lock")


def test_pt_has_exactly_the_webui_keys(tmp_path):
    big = torch.randn(10, 768, requires_grad=True)
    pos = {"clip_l": big[2:5]}  # a view: the file must not carry the whole storage
    files = save_pair(tmp_path, "walle", pos, _vectors(6, seed=1), gamma="1.5-3.0:cos", step=42, total_steps=100,
                      checkpoint_hash="abcdef0123", checkpoint_name="v1-5-pruned")
    assert [f.name for f in files] == ["walle.pt", "walle-neg.pt"]
    data = torch.load(files[0], map_location="cpu", weights_only=True)
    assert set(data) == WEBUI_PT_KEYS | {"dreamartist"}
    assert data["string_to_token"] == {"*": 265}
    assert data["name"] == "walle" and data["step"] == 42
    assert data["sd_checkpoint"] == "abcdef0123" and data["sd_checkpoint_name"] == "v1-5-pruned"
    (tensor,) = data["string_to_param"].values()
    assert list(data["string_to_param"]) == ["*"]
    assert type(tensor) is torch.Tensor and tensor.dtype == torch.float32 and tensor.shape == (3, 768)
    assert tensor.is_contiguous() and not tensor.requires_grad and tensor.device.type == "cpu"
    assert tensor.untyped_storage().nbytes() == 3 * 768 * 4
    assert all(isinstance(v, (str, int, float)) for v in data["dreamartist"].values())
    assert data["dreamartist"]["role"] == "positive" and data["dreamartist"]["partner"] == "walle-neg"

    for file in files:
        webui_safe_check(file)
    name, vec, step = webui_read(files[1])
    assert name == "walle-neg" and vec.shape == (6, 768) and vec.dtype == torch.float32 and step == 42
    name, vec, _ = webui_read(files[0])
    assert name == "walle" and torch.equal(vec, big[2:5].detach())


def test_safetensors_is_what_the_webui_reads(tmp_path):
    files = save_pair(tmp_path, "walle", _vectors(3), _vectors(5, seed=1), gamma="3", step=7, fmt="safetensors")
    assert [f.name for f in files] == ["walle.safetensors", "walle-neg.safetensors"]
    tensors = load_file(str(files[0]))
    assert list(tensors) == ["emb_params"]
    assert tensors["emb_params"].dtype == torch.float32 and tensors["emb_params"].shape == (3, 768)
    name, vec, _ = webui_read(files[1])
    assert name == "walle-neg" and torch.equal(vec, _vectors(5, seed=1)["clip_l"])
    with safe_open(str(files[1]), framework="pt") as f:
        metadata = f.metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert metadata["dreamartist.role"] == "negative" and metadata["dreamartist.partner"] == "walle"


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("width, key", [(768, "clip_l"), (1024, "clip_h")])
def test_round_trip_is_bit_exact_and_keeps_the_record(tmp_path, fmt, width, key):
    pos, neg = _vectors(3, width), _vectors(4, width, seed=1)
    save_pair(tmp_path, "walle", pos, neg, gamma="1.5-3.0:cos", step=40, total_steps=1500,
              checkpoint_hash="abc123", checkpoint_name="model", fmt=fmt)
    p, n = load_pair(tmp_path, "walle")
    assert list(p.vectors) == [key] and torch.equal(p.vectors[key], pos[key])
    assert torch.equal(n.vectors[key], neg[key])
    assert p.name == "walle" and n.name == "walle-neg" and p.step == 40 == n.step
    assert p.pair == PairMeta(role="positive", partner="walle-neg", gamma="1.5-3.0:cos", pos_len=3, neg_len=4,
                              step=40, total_steps=1500, base_model_hash="abc123", base_model_name="model",
                              encoders=key)
    assert n.pair.role == "negative" and n.pair.partner == "walle"
    assert family_of(p.vectors).key == {768: "sd1", 1024: "sd2"}[width]


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("key", ["clip_l", "clip_h"])
def test_our_pairs_keep_the_encoder_key_at_any_width(tmp_path, fmt, key):
    pos, neg = {key: torch.randn(2, 32)}, {key: torch.randn(3, 32)}  # a tiny test model's width
    save_pair(tmp_path, "walle", pos, neg, fmt=fmt)
    p, n = load_pair(tmp_path, "walle")
    assert torch.equal(p.vectors[key], pos[key]) and torch.equal(n.vectors[key], neg[key])
    torch.save({"emb_params": torch.zeros(1, 32)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="32-wide vectors; SD1 embeddings are 768 wide"):
        load_embedding(tmp_path / "foreign.pt")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_sdxl_pairs(tmp_path, fmt):
    pos, neg = _sdxl(2), _sdxl(3, seed=1)
    files = save_pair(tmp_path, "walle", pos, neg, fmt=fmt)
    _, vec, _ = webui_read(files[0])
    assert set(vec) == {"clip_l", "clip_g"} and torch.equal(vec["clip_g"], pos["clip_g"])
    p, n = load_pair(tmp_path, "walle")
    assert p.layout == "sdxl" and family_of(p.vectors).key == "sdxl"
    assert torch.equal(n.vectors["clip_l"], neg["clip_l"]) and torch.equal(n.vectors["clip_g"], neg["clip_g"])
    assert (p.pair is not None) == (fmt == "safetensors")  # the webui's SDXL reader allows only the two tensors


def test_other_trainers_files_load(tmp_path):
    vec = torch.randn(4, 768)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_()},
                "name": "old", "step": 900, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "old.pt")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec * 2},
                "name": "old-neg", "step": 900}, tmp_path / "old-neg.pt")
    save_file({"emb_params": vec[:2].contiguous()}, str(tmp_path / "kohya.safetensors"))
    torch.save({"<cat-toy>": torch.randn(1024)}, tmp_path / "learned_embeds.bin")
    p, n = load_pair(tmp_path, "old")
    assert p.pair is None and p.step == 900 and p.layout == "string_to_param"
    assert torch.equal(p.vectors["clip_l"], vec) and torch.equal(n.vectors["clip_l"], vec * 2)
    kohya = load_embedding(tmp_path / "kohya.safetensors")
    assert kohya.layout == "single" and torch.equal(kohya.vectors["clip_l"], vec[:2]) and kohya.step is None
    diffusers = load_embedding(tmp_path / "learned_embeds.bin")
    assert diffusers.name == "learned_embeds" and diffusers.vectors["clip_h"].shape == (1, 1024)


@pytest.mark.parametrize("data, message", [
    ({"string_to_param": {"*": torch.zeros(1, 768), "x": torch.zeros(1, 768)}}, "exactly one word"),
    ({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, "not a textual-inversion embedding"),
    ({"emb_params": torch.zeros(1, 768), "step": 3}, "not a textual-inversion embedding"),
    ({"emb_params": torch.zeros(2, 640)}, "640-wide"),
    ({"emb_params": torch.zeros(2, 3, 768)}, "1-D or 2-D"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "SDXL keys"),
    ([torch.zeros(1, 768)], "holds a list"),
])
def test_unsupported_contents_are_input_errors(tmp_path, data, message):
    torch.save(data, tmp_path / "odd.pt")
    with pytest.raises(InputError, match=message):
        load_embedding(tmp_path / "odd.pt")


def test_unreadable_files_are_input_errors(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "text.safetensors").write_text("hello")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="text.pt is not a readable"):
        load_embedding(tmp_path / "text.pt")
    with pytest.raises(InputError, match="text.safetensors is not a readable safetensors"):
        load_embedding(tmp_path / "text.safetensors")
    with pytest.raises(InputError, match="not an embedding file"):
        load_embedding(tmp_path / "pic.png")
    with pytest.raises(InputError, match="does not exist"):
        load_embedding(tmp_path / "gone.pt")


class _Payload:
    """Pickles as a call to open(marker, 'w'): loading it the unsafe way creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "extra": _Payload(marker)}, path)
    with pytest.raises(InputError, match=r"evil\.pt is not a plain tensor file \(refused for safety\)"):
        load_embedding(path)
    assert not marker.exists()
    torch.save({"step": 1, "x": _Payload(marker)}, tmp_path / "walle.dreamartist-state")
    with pytest.raises(InputError, match="refused for safety"):
        load_state(tmp_path, "walle")
    assert not marker.exists()
    torch.load(path, weights_only=False)["extra"].close()  # the unsafe way runs the payload: it is real
    assert marker.exists()


def test_clashes_are_found_in_subfolders_and_any_case(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "WALLE.safetensors").write_bytes(b"x")
    (tmp_path / "sub" / "Walle-Neg.webp").write_bytes(b"x")
    for harmless in ("walle.preview.png", "walle.dreamartist-state", "walle.txt", "walle2.pt", "wall-e.pt"):
        (tmp_path / harmless).write_bytes(b"x")
    clashes = find_clashes(tmp_path, ["walle", "walle-neg"])
    assert sorted(str(p.relative_to(tmp_path)) for p in clashes) == [
        os.path.join("sub", "Walle-Neg.webp"), os.path.join("sub", "deeper", "WALLE.safetensors")]
    before = _listing(tmp_path)
    with pytest.raises(InputError, match=r"WALLE\.safetensors.*allow overwriting"):
        save_pair(tmp_path, "walle", _vectors(1), _vectors(1))
    assert _listing(tmp_path) == before


def test_overwrite_replaces_exactly_the_pairs_own_files(tmp_path):
    save_pair(tmp_path, "walle", _vectors(1), _vectors(1), fmt="safetensors", state={"step": 1})
    (tmp_path / "walle.preview.png").write_bytes(b"keep")
    (tmp_path / "walle2.pt").write_bytes(b"keep")
    files = save_pair(tmp_path, "walle", _vectors(2, seed=5), _vectors(2, seed=6), overwrite=True)
    assert _listing(tmp_path) == ["walle-neg.pt", "walle.preview.png", "walle.pt", "walle2.pt"]
    p, _ = load_pair(tmp_path, "walle")
    assert torch.equal(p.vectors["clip_l"], _vectors(2, seed=5)["clip_l"]) and p.path == files[0]
    assert load_state(tmp_path, "walle") is None  # the old state belonged to the replaced pair


@pytest.mark.parametrize("other", ["sub/WALLE.safetensors", "Walle-Neg.webp", "walle.png"])
def test_overwrite_refuses_files_that_are_not_the_pairs_own(tmp_path, other):
    save_pair(tmp_path, "walle", _vectors(1), _vectors(1))
    (tmp_path / other).parent.mkdir(exist_ok=True)
    (tmp_path / other).write_bytes(b"someone else's embedding")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match=rf"replaces only the pair's own .*{re.escape(Path(other).name)}"):
        save_pair(tmp_path, "walle", _vectors(2), _vectors(2), overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_a_link_not_what_it_points_to(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.pt").write_bytes(b"not ours")
    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "walle.pt").symlink_to(outside / "target.pt")
    save_pair(folder, "walle", _vectors(1), _vectors(1), overwrite=True)
    assert (outside / "target.pt").read_bytes() == b"not ours"
    assert not (folder / "walle.pt").is_symlink() and load_pair(folder, "walle")[0].vectors


def test_failed_second_write_leaves_nothing(tmp_path, monkeypatch):
    real = fileops.write_temp
    calls = []

    def failing(folder, name, payload):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(folder, name, payload)

    monkeypatch.setattr(fileops, "write_temp", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pair(tmp_path / "emb", "walle", _vectors(3), _vectors(3))
    assert len(calls) == 2 and _listing(tmp_path / "emb") == []


def test_failed_replace_restores_every_old_file(tmp_path, monkeypatch):
    save_pair(tmp_path, "walle", _vectors(3), _vectors(3, seed=1), fmt="safetensors", state={"step": 3})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"}
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "walle-neg.pt":
            raise OSError("device busy")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="device busy"):
        save_pair(tmp_path, "walle", _vectors(3, seed=7), _vectors(3, seed=8), overwrite=True, state={"step": 9})
    monkeypatch.setattr(os, "replace", real)
    assert "walle.pt" in calls  # the positive was already in place when the negative failed
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"} == before


_DIE_AFTER_FIRST_RENAME = """
import os, sys, torch
from dreamartist import fileops, pairfiles
def dying(folder, record):
    os.replace(fileops.work_dir(folder) / record["moves"][0][0], folder / record["moves"][0][1])
    os._exit(9)  # the process dies between the renames: no except or finally clause runs
fileops._apply = dying
vec = lambda seed: {"clip_l": torch.randn(3, 768, generator=torch.Generator().manual_seed(seed))}
pairfiles.save_pair(sys.argv[1], "walle", vec(7), vec(8), overwrite=True, state={"step": 2})
"""


def test_a_commit_cut_short_by_process_death_is_finished_by_recovery(tmp_path):
    save_pair(tmp_path, "walle", _vectors(3), _vectors(3, seed=1))
    died = subprocess.run([sys.executable, "-c", _DIE_AFTER_FIRST_RENAME, str(tmp_path)], cwd=Path(__file__).parents[1])
    assert died.returncode == 9
    half = load_embedding(tmp_path / "walle.pt"), load_embedding(tmp_path / "walle-neg.pt")
    assert torch.equal(half[0].vectors["clip_l"], _vectors(3, seed=7)["clip_l"])  # new S^p beside the old S^n
    assert torch.equal(half[1].vectors["clip_l"], _vectors(3, seed=1)["clip_l"])
    fileops.recover_folder(tmp_path)
    pos, neg = load_pair(tmp_path, "walle")
    assert torch.equal(pos.vectors["clip_l"], _vectors(3, seed=7)["clip_l"])
    assert torch.equal(neg.vectors["clip_l"], _vectors(3, seed=8)["clip_l"])
    assert load_state(tmp_path, "walle") == {"step": 2}
    assert _listing(tmp_path) == ["walle-neg.pt", "walle.dreamartist-state", "walle.pt"]


def test_recovery_removes_stale_temporary_files_and_ignores_foreign_journals(tmp_path):
    save_pair(tmp_path, "walle", _vectors(1), _vectors(1))
    stale = fileops.write_temp(tmp_path, "walle", b"half written")
    legacy = tmp_path / ".dreamartist-0123456789abcdef.tmp"
    legacy.write_bytes(b"x")
    journal = fileops.work_dir(tmp_path) / "walle.commit"
    journal.write_text('{"moves": [["../../etc/passwd", "walle.pt"]], "removals": []}')
    before = (tmp_path / "walle.pt").read_bytes()
    fileops.recover_folder(tmp_path)
    assert not stale.exists() and not legacy.exists() and not journal.exists()
    assert (tmp_path / "walle.pt").read_bytes() == before


def test_a_second_holder_of_a_pairs_lock_is_refused_at_once(tmp_path):
    with fileops.pair_lock(tmp_path, "walle"):
        with pytest.raises(PairBusy, match="Another training of Walle"):
            with fileops.pair_lock(tmp_path, "Walle"):
                pass
        with fileops.pair_lock(tmp_path, "other"):
            pass
    with fileops.pair_lock(tmp_path, "walle"):
        pass


def test_bad_pairs_are_refused_before_writing(tmp_path):
    with pytest.raises(InputError, match="file format"):
        save_pair(tmp_path, "walle", _vectors(1), _vectors(1), fmt="ckpt")
    with pytest.raises(InputError, match="different text encoders"):
        save_pair(tmp_path, "walle", _vectors(1), _vectors(1, 1024))
    with pytest.raises(InputError, match="NaN or infinity"):
        save_pair(tmp_path, "walle", {"clip_l": torch.full((1, 768), float("nan"))}, _vectors(1))
    with pytest.raises(InputError, match="reserved for the negative"):
        save_pair(tmp_path, "walle-neg", _vectors(1), _vectors(1))
    assert _listing(tmp_path) == []


def test_load_pair_needs_one_file_per_name(tmp_path):
    save_pair(tmp_path, "walle", _vectors(1), _vectors(1))
    (tmp_path / "walle-neg.pt").rename(tmp_path / "robot.pt")
    with pytest.raises(InputError, match="No embedding file named robot-neg"):
        load_pair(tmp_path, "robot")
    with pytest.raises(InputError, match="No embedding file named walle-neg"):
        load_pair(tmp_path, "walle")
    (tmp_path / "robot.pt").rename(tmp_path / "walle-neg.pt")
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": torch.zeros(1, 768)}, str(tmp_path / "sub" / "walle.safetensors"))
    with pytest.raises(InputError, match="Several files are named walle"):
        load_pair(tmp_path, "walle")


def test_list_pairs(tmp_path):
    save_pair(tmp_path, "walle", _vectors(1), _vectors(1))
    save_pair(tmp_path / "styles", "Shuimo", _vectors(1), _vectors(1), fmt="safetensors")
    torch.save({"emb_params": torch.zeros(1, 768)}, tmp_path / "lonely.pt")
    torch.save({"emb_params": torch.zeros(1, 768)}, tmp_path / "orphan-neg.pt")
    (tmp_path / "cat.png").write_bytes(b"x")
    (tmp_path / "cat-neg.png").write_bytes(b"x")
    assert list_pairs(tmp_path) == {"Shuimo": "Shuimo-neg", "walle": "walle-neg"}
    assert list_pairs(tmp_path / "missing") == {}


def test_check_compatible():
    check_compatible(_vectors(2), {"clip_l": 768}, "walle.pt")
    expected = r"^walle\.pt was trained for SD2 \(1024-wide\), the loaded model is SD1 \(768-wide\)\.$"
    with pytest.raises(InputError, match=expected):
        check_compatible(_vectors(2, 1024), {"clip_l": 768}, Path("/x/walle.pt"))
    with pytest.raises(InputError, match=r"trained for SDXL \(768\+1280-wide\), the loaded model is SD2 \(1024-wide\)"):
        check_compatible(_sdxl(1), {"clip_h": 1024}, "walle.safetensors")
    with pytest.raises(InputError, match="Unknown text-encoder set"):
        family_of({"t5": torch.zeros(1, 4)})


def test_resume_state_round_trip(tmp_path):
    vec = torch.randn(3, 768, requires_grad=True)
    optimizer = torch.optim.AdamW([vec], lr=0.01, betas=(0.9, 0.99))
    vec.sum().backward()
    optimizer.step()
    state = {"step": 17, "optimizer": optimizer.state_dict(), "ema": {"pos": vec.detach() * 0.5},
             "rng": torch.get_rng_state(), "losses": [0.5, 0.25], "config": {"gamma": "3"}}
    save_pair(tmp_path, "walle", _vectors(1), _vectors(1), state=state)
    path = tmp_path / "walle.dreamartist-state"
    assert webui_read(path) is None
    webui_safe_check(path)
    loaded = load_state(tmp_path, "walle")
    assert loaded["step"] == 17 and loaded["losses"] == [0.5, 0.25] and torch.equal(loaded["rng"], state["rng"])
    restored = torch.optim.AdamW([torch.zeros(3, 768, requires_grad=True)], lr=1.0)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.9, 0.99)
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert load_state(tmp_path, "other") is None
    assert _listing(tmp_path) == ["walle-neg.pt", "walle.dreamartist-state", "walle.pt"]


def test_a_large_resume_state_goes_into_its_file_a_record_at_a_time(tmp_path):
    """An SDXL identity's resume state is 2.5 GB: it is streamed into its file, never whole in a Python buffer
    (what tracemalloc sees; the tensors' own storage it does not), and read back as the webui reads it."""
    moments = [torch.randn(4 << 20), torch.randn(4 << 20)]  # 16 MB each
    tracemalloc.start()
    try:
        save_pair(tmp_path, "walle", _vectors(1), _vectors(1), state={"step": 2, "moments": moments})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak >> 20} MB held at once"
    webui_safe_check(tmp_path / "walle.dreamartist-state")
    loaded = load_state(tmp_path, "walle")
    assert all(torch.equal(a, b) for a, b in zip(loaded["moments"], moments, strict=True))
    assert _listing(tmp_path) == ["walle-neg.pt", "walle.dreamartist-state", "walle.pt"]  # no scratch file left


@pytest.mark.parametrize("bad", [lambda tmp: _Payload(tmp / "m"), lambda tmp: torch.zeros(2, dtype=torch.bool)])
def test_resume_state_refuses_what_the_webui_would_not_read(tmp_path, bad):
    with pytest.raises(TypeError, match="resume state holds a"):
        save_pair(tmp_path, "walle", _vectors(1), _vectors(1), state={"x": [bad(tmp_path)]})
    assert _listing(tmp_path) == []
