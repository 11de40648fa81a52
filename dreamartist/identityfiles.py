"""An identity on disk: ``NAME.identity.safetensors``, its own format, which no embedding loader reads.

Tensors: ``kv_tokens.<encoder>`` float32 (S, 2, 1, dim), [s, 0] the stage's K token and [s, 1] its V token (equal
without the K/V split); ``module/<parameter>`` the trained block, in files written before it moved to the resume state
(``NAME.dreamartist-state``, which training writes beside the identity). Metadata (strings): the format id
and version, the name, ``num_stages``, ``stage_bounds`` ("0,200,400,600,800,1000"), ``stage_rule``, ``kv_split``,
``encoders`` and ``widths``, the base model's hash and name, and the training settings. The webui keeps identities
outside its embeddings folder (its loader would read a .safetensors there as a broken embedding); the command line
writes them beside the pairs, as ``generate --embeddings DIR`` finds both there.
"""
from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from . import pairfiles
from .errors import InputError
from .fileops import walk_files, write_together
from .identity import IdentityTokens, stage_bounds
from .names import validate_name

SUFFIX = ".identity.safetensors"
FORMAT = "dreamartist-identity"
VERSION = "1"
STAGE_RULE = "floor(t*S/1000)"
_MODULE = "module/"
_TOKENS = "kv_tokens."


@dataclass
class IdentityFile:
    name: str
    tokens: IdentityTokens
    meta: dict[str, str]
    module: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def step(self) -> int:
        return int(self.meta.get("step", "0") or 0)

    @property
    def kv_split(self) -> bool:
        return self.meta.get("kv_split") == "true"


def path_of(folder: str | Path, name: str) -> Path:
    return Path(folder) / f"{name}{SUFFIX}"


def save_identity(folder: str | Path, name: str, tokens: IdentityTokens, module: Mapping[str, torch.Tensor],
                  meta: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the identity (and its resume ``state``) as one commit. The caller holds ``fileops.pair_lock`` for
    ``name``. Returns the identity file first."""
    validate_name(name)
    folder = Path(folder)
    stages = tokens.stages
    record = {"format": FORMAT, "version": VERSION, "name": name, "num_stages": str(stages),
              "stage_bounds": ",".join(map(str, stage_bounds(stages))), "stage_rule": STAGE_RULE,
              "encoders": ",".join(tokens.tokens), "widths": ",".join(str(t.shape[-1]) for t in tokens.tokens.values()),
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    record |= {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in meta.items()}
    tensors = {f"{_TOKENS}{key}": t.detach().float().cpu().reshape(stages, 2, 1, -1).contiguous()
               for key, t in tokens.tokens.items()}
    tensors |= {f"{_MODULE}{key}": t.detach().float().cpu().contiguous() for key, t in module.items()}
    payloads = [(path_of(folder, name), safetensors_bytes(tensors, metadata=record))]
    if state is not None:
        payloads.append((folder / f"{name}{pairfiles.STATE_SUFFIX}", pairfiles.state_writer(state)))
    write_together(folder, name, payloads, check=pairfiles.read_back)
    return [target for target, _ in payloads]


def export_name(name: str) -> str:
    """The name of the optional ordinary embedding, the stage-mean K token (``IdentityTokens.stage_mean_key``)."""
    return f"{name}-identity"


def load_identity(path: str | Path) -> IdentityFile:
    """Read an identity file; InputError in one sentence when it is not one."""
    path = Path(path)
    tensors, meta = pairfiles._read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise InputError(f"{path.name} is not a DreamArtist identity file.")
    if meta.get("version") != VERSION:
        raise InputError(f"{path.name} is an identity file of version {meta.get('version')}; this extension reads "
                         f"version {VERSION}.")
    tokens = {k[len(_TOKENS):]: t.float().squeeze(2) for k, t in tensors.items() if k.startswith(_TOKENS)}
    stages = int(meta.get("num_stages", "0") or 0)
    if not tokens or any(t.ndim != 3 or t.shape[:2] != (stages, 2) for t in tokens.values()):
        raise InputError(f"{path.name} holds no (stages, 2, 1, width) token tensors.")
    module = {k[len(_MODULE):]: t for k, t in tensors.items() if k.startswith(_MODULE)}
    return IdentityFile(meta.get("name") or path.name[:-len(SUFFIX)], IdentityTokens(tokens), meta, module, path)


def list_identities(folder: str | Path) -> dict[str, Path]:
    """Identity name -> file, for every identity file in ``folder`` and its subfolders (names as written)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name[:-len(SUFFIX)]: p for p in walk_files(folder) if p.name.endswith(SUFFIX)}


def check_compatible(identity: IdentityFile, embedding_dims: Mapping[str, int]) -> None:
    """InputError when the identity was trained for other text encoders than the model's."""
    widths = {k: t.shape[-1] for k, t in identity.tokens.tokens.items()}
    if any(widths.get(key) != width for key, width in embedding_dims.items()):
        raise InputError(f"The identity {identity.name} was trained for other text encoders "
                         f"({', '.join(f'{k} {w}' for k, w in widths.items())}) than the loaded model's "
                         f"({', '.join(f'{k} {w}' for k, w in embedding_dims.items())}).")
