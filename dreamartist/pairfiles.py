"""The pair on disk: NAME and NAME-neg as textual-inversion files the webui loads with no extension.

A ``.pt`` holds the webui's own keys (string_to_token, string_to_param, name, step, sd_checkpoint,
sd_checkpoint_name) plus ``dreamartist``, the pair record as a plain dict, which the webui ignores. A
``.safetensors`` holds one tensor under kohya's key ``emb_params`` (SDXL: ``clip_l`` and ``clip_g``) and the
pair record in its metadata. Vectors are dicts keyed by text encoder (dreamartist.families).
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import InputError, NameTaken
from .families import SINGLE_ENCODER_BY_WIDTH, describe, family_of
from .fileops import Payload, walk_files, write_together
from .names import negative_name, validate_name

FORMAT_VERSION = 1
FILE_FORMATS = {"pt": ".pt", "safetensors": ".safetensors"}
LOADABLE_EXTS = (".pt", ".bin", ".safetensors")
EMBEDDING_EXTS = LOADABLE_EXTS + (".png", ".webp", ".jxl", ".avif")  # everything the webui reads as an embedding
STATE_SUFFIX = ".dreamartist-state"  # an extension the webui's embedding loader skips
ADAPTERS_SUFFIX = ".dreamartist-lora"  # safetensors inside; neither the embedding nor the Lora loader reads it
_RECORD_KEY = "dreamartist"
# Tensor types every webui's safe loader accepts (its allowlist of storages), which is all a resume state needs.
_PLAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8)
_WEBUI_TOKEN = {"*": 265}  # the token id the webui writes in every embedding file
# The webui's safe loader (modules/safe.py) rejects a .pt whose zip holds other records than these; newer torch
# adds byteorder, .data/serialization_id, .format_version and .storage_alignment, all optional when loading.
_WEBUI_ZIP_RECORDS = re.compile(r"^[^/]+/(data\.pkl|version|data/\d+)$")


@dataclass
class PairMeta:
    """What one file of a pair records about the pair."""

    role: str  # "positive" | "negative"
    partner: str  # the other file's name
    gamma: str = ""
    pos_len: int = 0
    neg_len: int = 0
    step: int = 0
    total_steps: int = 0
    base_model_hash: str = ""
    base_model_name: str = ""
    encoders: str = ""  # the vectors' encoder keys, comma-separated: keeps the key of any width
    version: int = FORMAT_VERSION

    def to_record(self) -> dict[str, str | int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PairMeta | None:
        """Read a record written by ``to_record`` (values may be strings, as in safetensors metadata)."""
        try:
            values = {}
            for f in dataclasses.fields(cls):
                if f.name in record:
                    values[f.name] = int(record[f.name]) if f.type == "int" else str(record[f.name])
            meta = cls(**values)
        except (TypeError, ValueError):
            return None
        return meta if meta.role in ("positive", "negative") else None


@dataclass
class EmbeddingFile:
    """One embedding read from disk."""

    path: Path
    name: str  # the file stem: the word the webui registers
    vectors: dict[str, torch.Tensor]  # encoder key -> (n, dim) float32, CPU
    step: int | None
    pair: PairMeta | None  # the DreamArtist record; None for other files
    layout: str  # "string_to_param" (webui/DreamArtist), "single" (kohya/diffusers), "sdxl"


def check_compatible(vectors: Mapping[str, torch.Tensor], embedding_dims: Mapping[str, int],
                     path: str | Path) -> None:
    """InputError when ``vectors`` do not fit the loaded model's text encoders."""
    have = {k: int(v.shape[-1]) for k, v in vectors.items()}
    if have != dict(embedding_dims):
        raise InputError(f"{Path(path).name} was trained for {describe(have)}, "
                         f"the loaded model is {describe(embedding_dims)}.")


def find_clashes(folder: str | Path, names: list[str] | tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` (subfolders too, as the webui walks them) that the webui would load under
    one of ``names``: same stem, compared case-insensitively, with an embedding extension."""
    wanted = {n.lower() for n in names}
    return [p for p in walk_files(Path(folder))
            if p.suffix.lower() in EMBEDDING_EXTS and p.stem.lower() in wanted]


def own_files(folder: str | Path, name: str) -> list[Path]:
    """The files of pair ``name`` directly in ``folder`` that saving it may replace: NAME and NAME-neg as .pt,
    .bin or .safetensors, and NAME's resume state (names compared case-insensitively, links not followed)."""
    wanted = {n.lower() + ext for n in (name, negative_name(name)) for ext in LOADABLE_EXTS}
    wanted |= {name.lower() + STATE_SUFFIX, name.lower() + ADAPTERS_SUFFIX}
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.name.lower() in wanted) if folder.is_dir() else []


def check_can_save(folder: str | Path, name: str, overwrite: bool) -> None:
    """InputError unless pair ``name`` can be written to ``folder``: no file the webui would load under NAME or
    NAME-neg exists anywhere under it, or (with ``overwrite``) only the pair's own files do."""
    folder = Path(folder)
    clashes = find_clashes(folder, [name, negative_name(name)])
    if not clashes:
        return
    if not overwrite:
        shown = ", ".join(map(str, clashes))
        raise NameTaken(f"The webui already has an embedding named {name} or {negative_name(name)}: {shown}. "
                         "Choose another name, or allow overwriting to replace it.")
    others = [c for c in clashes if c not in own_files(folder, name)]
    if others:
        raise NameTaken(f"Overwriting replaces only the pair's own .pt/.safetensors files in {folder}, but "
                         f"{others[0]} also names {name} or {negative_name(name)} for the webui; "
                         "move or rename it first, or choose another name.")


def save_pair(folder: str | Path, name: str, pos: Mapping[str, torch.Tensor], neg: Mapping[str, torch.Tensor], *,
              gamma: str = "", step: int = 0, total_steps: int = 0, checkpoint_hash: str = "",
              checkpoint_name: str = "", fmt: str = "pt", overwrite: bool = False,
              state: Mapping[str, Any] | None = None,
              adapters: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list[Path]:
    """Write NAME and NAME-neg (and the resume ``state``, and the ``adapters``: group -> named tensors) as one
    commit: all files appear, or nothing changes.

    Refuses as ``check_can_save`` does. With ``overwrite`` the pair's own files are replaced (removed when their
    extension differs); a resume state left from an earlier save is removed when no ``state`` is given. Each
    ``.pt`` is read back through ``torch.load`` before it is committed, the route by which the webui (whose
    safe loader replaces ``torch.load``) and resuming read it later, so a file they would refuse is never
    written. SDXL ``.pt`` files hold only the two tensors (the webui's SDXL reader accepts nothing else), so
    their pair record lives in ``.safetensors`` files only. The caller holds ``fileops.pair_lock``.
    Returns [NAME file, NAME-neg file].
    """
    validate_name(name)
    if fmt not in FILE_FORMATS:
        raise InputError(f"The file format must be one of {', '.join(FILE_FORMATS)}; got {fmt!r}.")
    folder = Path(folder)
    neg_name = negative_name(name)
    pos, neg = _plain(pos, name), _plain(neg, neg_name)
    if family_of(pos) is not family_of(neg):
        raise InputError(f"{name} and {neg_name} were made for different text encoders.")
    check_can_save(folder, name, overwrite)
    common = dict(gamma=gamma, pos_len=_length(pos), neg_len=_length(neg), step=step, total_steps=total_steps,
                  base_model_hash=checkpoint_hash, base_model_name=checkpoint_name, encoders=",".join(sorted(pos)))
    payloads = [(folder / f"{name}{FILE_FORMATS[fmt]}",
                 _serialize(fmt, name, pos, PairMeta(role="positive", partner=neg_name, **common),
                            checkpoint_hash, checkpoint_name)),
                (folder / f"{neg_name}{FILE_FORMATS[fmt]}",
                 _serialize(fmt, neg_name, neg, PairMeta(role="negative", partner=name, **common),
                            checkpoint_hash, checkpoint_name))]
    if state is not None:
        payloads.append((folder / f"{name}{STATE_SUFFIX}", state_writer(state)))
    if adapters:
        tensors = {f"{group}/{key}": _plain_tensor(t) for group, named in adapters.items() for key, t in named.items()}
        metadata = {f"{_RECORD_KEY}.{k}": str(v) for k, v in common.items()} | {f"{_RECORD_KEY}.name": name}
        payloads.append((folder / f"{name}{ADAPTERS_SUFFIX}", safetensors_bytes(tensors, metadata=metadata)))
    write_together(folder, name, payloads, check=read_back,
                   stale=lambda targets: [f for f in own_files(folder, name) if _replaced_by_none_of(f, targets)])
    return [target for target, _ in payloads[:2]]


def load_embedding(path: str | Path) -> EmbeddingFile:
    """Read a .pt/.bin (plain tensors only: pickled code is refused) or .safetensors embedding."""
    path = Path(path)
    if path.suffix.lower() not in LOADABLE_EXTS:
        raise InputError(f"{path.name} is not an embedding file ({', '.join(LOADABLE_EXTS)}).")
    if not path.is_file():
        raise InputError(f"{path} does not exist.")
    if path.suffix.lower() == ".safetensors":
        data, metadata = _read_safetensors(path)
        record = {k[len(_RECORD_KEY) + 1:]: v for k, v in metadata.items() if k.startswith(_RECORD_KEY + ".")}
    else:
        data = _torch_load(path)
        record = data.get(_RECORD_KEY) if isinstance(data, dict) else None
    pair = PairMeta.from_record(record) if isinstance(record, Mapping) else None
    vectors, layout = _vectors_of(data, path, pair.encoders if pair else "")
    step = data.get("step") if layout == "string_to_param" else None
    step = step if isinstance(step, int) else (pair.step if pair else None)
    return EmbeddingFile(path=path, name=path.stem, vectors=vectors, step=step, pair=pair, layout=layout)


def load_pair(folder: str | Path, name: str) -> tuple[EmbeddingFile, EmbeddingFile]:
    """Load NAME and NAME-neg from ``folder`` or its subfolders (our pairs or original DreamArtist files)."""
    return _find_one(Path(folder), name), _find_one(Path(folder), negative_name(name))


def list_pairs(folder: str | Path) -> dict[str, str]:
    """Positive name -> partner name for every NAME with a NAME-neg under ``folder`` (names as on disk)."""
    stems: dict[str, str] = {}
    for p in walk_files(Path(folder)):
        if p.suffix.lower() in LOADABLE_EXTS:
            stems.setdefault(p.stem.lower(), p.stem)
    return {stem: stems[key + "-neg"] for key, stem in sorted(stems.items())
            if not key.endswith("-neg") and key + "-neg" in stems}


def _replaced_by_none_of(path: Path, targets: list[Path]) -> bool:
    """Whether ``path`` stays behind after the targets are written (a differently cased name on a case-sensitive
    file system stays; on a case-insensitive one it is the target itself)."""
    for target in targets:
        if path.name == target.name:
            return False
        if path.name.lower() == target.name.lower():
            return not (target.exists() and os.path.samefile(path, target))
    return True


def load_adapters(folder: str | Path, name: str) -> dict[str, dict[str, torch.Tensor]] | None:
    """The adapters saved with pair ``name`` (group -> named tensors), or None when it has none."""
    path = Path(folder) / f"{name}{ADAPTERS_SUFFIX}"
    if not path.is_file():
        return None
    tensors, _ = _read_safetensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        group, _, param = key.partition("/")
        groups.setdefault(group, {})[param] = tensor.float()
    return groups


def load_state(folder: str | Path, name: str) -> dict | None:
    """The resume state saved for NAME, or None when there is none."""
    path = Path(folder) / f"{name}{STATE_SUFFIX}"
    if not path.is_file():
        return None
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise InputError(f"{path.name} is not a DreamArtist resume state.")
    return state


def _find_one(folder: Path, name: str) -> EmbeddingFile:
    found = [p for p in find_clashes(folder, [name]) if p.suffix.lower() in LOADABLE_EXTS]
    if not found:
        raise InputError(f"No embedding file named {name} ({', '.join(LOADABLE_EXTS)}) in {folder}.")
    if len(found) > 1:
        raise InputError(f"Several files are named {name}: {', '.join(map(str, found))}; keep only one.")
    return load_embedding(found[0])


def _plain(vectors: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Detached float32 contiguous CPU copies (a view would otherwise save its whole storage)."""
    family_of(vectors)
    out = {}
    for key, tensor in vectors.items():
        if tensor.ndim != 2 or tensor.shape[0] < 1:
            raise InputError(f"The {key} vectors of {name} must have shape (n, dim); got {tuple(tensor.shape)}.")
        out[key] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        if not torch.isfinite(out[key]).all():
            raise InputError(f"The vectors of {name} contain NaN or infinity; nothing was written.")
    return out


def _plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    plain = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    if not torch.isfinite(plain).all():
        raise InputError("The adapters contain NaN or infinity; nothing was written.")
    return plain


def _length(vectors: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(vectors.values())).shape[0])


def _serialize(fmt: str, name: str, vectors: dict[str, torch.Tensor], meta: PairMeta,
               checkpoint_hash: str, checkpoint_name: str) -> bytes:
    sdxl = family_of(vectors).key == "sdxl"
    if fmt == "safetensors":
        tensors = vectors if sdxl else {"emb_params": next(iter(vectors.values()))}
        metadata = {f"{_RECORD_KEY}.{k}": str(v) for k, v in meta.to_record().items()}
        return safetensors_bytes(tensors, metadata=metadata)
    return embedding_bytes(name, vectors, checkpoint_hash, checkpoint_name, meta.step, meta.to_record())


def read_back(written: Path, target: Path) -> None:
    """A torch file (a zip) read back the way it will be read (the webui's safe loader; resuming): a file they would
    refuse is never committed. Its tensors land on the meta device, so no more than one is in memory at a time."""
    with open(written, "rb") as f:
        if f.read(2) == b"PK":
            _torch_load(written, target.name, map_location="meta")


def embedding_bytes(name: str, vectors: Mapping[str, torch.Tensor], checkpoint_hash: str = "",
                    checkpoint_name: str = "", step: int = 0, record: Mapping[str, Any] | None = None) -> bytes:
    """One ordinary textual-inversion ``.pt`` the webui reads without this extension (SDXL: the two tensors only)."""
    vectors = _plain(vectors, name)
    if family_of(vectors).key == "sdxl":
        return _torch_bytes(dict(vectors))
    data = {"string_to_token": dict(_WEBUI_TOKEN), "string_to_param": {"*": next(iter(vectors.values()))},
            "name": name, "step": step, "sd_checkpoint": checkpoint_hash or None,
            "sd_checkpoint_name": checkpoint_name or None}
    if record is not None:
        data[_RECORD_KEY] = dict(record)
    return _torch_bytes(data)


def state_writer(state: Mapping[str, Any]) -> Payload:
    """The resume state as a torch file, written straight into the file (an SDXL identity's is 2.5 GB, never whole
    in memory); TypeError naming the problem when it holds more than plain data."""
    bad = _non_plain(state)
    if bad:
        raise TypeError(f"The resume state holds a {bad}, not only tensors, numbers, strings, lists and dicts.")

    def write(out: BinaryIO) -> None:
        with tempfile.TemporaryFile(dir=os.path.dirname(out.name)) as scratch:  # beside the file, not in memory
            _save_for_webui(dict(state), scratch, out)
    return write


def _non_plain(value: Any) -> str:
    """The type name of the first value in ``value`` that weights-only loading would refuse ("" when none)."""
    if isinstance(value, torch.Tensor):
        return "" if value.dtype in _PLAIN_DTYPES else f"{value.dtype} tensor"
    if isinstance(value, Mapping):
        return next((bad for item in value.items() for bad in map(_non_plain, item) if bad), "")
    if isinstance(value, (list, tuple)):
        return next((bad for bad in map(_non_plain, value) if bad), "")
    return "" if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__


def _torch_bytes(data: Any) -> bytes:
    out = io.BytesIO()
    _save_for_webui(data, io.BytesIO(), out)
    return out.getvalue()


def _save_for_webui(data: Any, scratch: BinaryIO, out: BinaryIO) -> None:
    """``torch.save`` into ``scratch``, repacked into ``out`` with only the records every webui version accepts
    (little-endian data), a record at a time."""
    torch.save(data, scratch)
    scratch.seek(0)
    with zipfile.ZipFile(scratch) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if _WEBUI_ZIP_RECORDS.match(info.filename):
                record = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                record.file_size = info.file_size  # zip64 where a record needs it
                with src.open(info) as data_in, dst.open(record, "w") as data_out:
                    shutil.copyfileobj(data_in, data_out, 1 << 20)


def _torch_load(path: Path, label: str = "", map_location: str = "cpu") -> Any:
    """``torch.load`` with weights only: inside the webui its safe loader runs first (it may refuse, and then
    returns None), so this reads a file exactly as the webui reads an embedding."""
    label = label or path.name
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file can fail with almost any exception type inside the unpickler
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise InputError(f"{label} is not a plain tensor file (refused for safety): it asks to run "
                             "code while loading, so it was not opened.") from None
        raise InputError(f"{label} is not a readable tensor file ({type(e).__name__}: {e}).") from None
    if data is None:
        raise InputError(f"{label} was refused by the webui's safe loader (its console says why).")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed header
        raise InputError(f"{path.name} is not a readable safetensors file ({e}).") from None


def _vectors_of(data: Any, path: Path, encoder: str) -> tuple[dict[str, torch.Tensor], str]:
    """The webui's reading rules: string_to_param, then SDXL clip_l+clip_g, then a lone tensor.

    A lone tensor belongs to ``encoder`` when the pair record names one, else to the encoder of its width.
    """
    if not isinstance(data, dict):
        raise InputError(f"{path.name} is not an embedding file (it holds a {type(data).__name__}).")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise InputError(f"{path.name} must hold exactly one word in string_to_param.")
        return _single(next(iter(params.values())), path, encoder), "string_to_param"
    if "clip_l" in data and "clip_g" in data:
        vectors = {k: _matrix(data[k], path) for k in ("clip_l", "clip_g")}  # any widths, as the webui reads them
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise InputError(f"{path.name} has SDXL keys but shapes {[tuple(v.shape) for v in vectors.values()]}.")
        return vectors, "sdxl"
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return _single(next(iter(data.values())), path, encoder), "single"
    keys = ", ".join(map(str, list(data)[:5]))
    raise InputError(f"{path.name} is not a textual-inversion embedding (keys: {keys}).")


def _single(tensor: Any, path: Path, encoder: str) -> dict[str, torch.Tensor]:
    vec = _matrix(tensor, path)
    key = encoder if encoder in SINGLE_ENCODER_BY_WIDTH.values() else SINGLE_ENCODER_BY_WIDTH.get(int(vec.shape[1]))
    if key is None:
        raise InputError(f"{path.name} holds {vec.shape[1]}-wide vectors; SD1 embeddings are 768 wide "
                         "and SD2 embeddings 1024 wide.")
    return {key: vec}


def _matrix(tensor: Any, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim not in (1, 2):
        raise InputError(f"{path.name} does not hold a 1-D or 2-D floating-point tensor.")
    return (tensor.unsqueeze(0) if tensor.ndim == 1 else tensor).detach().to(torch.float32).contiguous()
