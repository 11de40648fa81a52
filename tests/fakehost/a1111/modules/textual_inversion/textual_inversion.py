"""modules.textual_inversion.textual_inversion: Embedding and the EmbeddingDatabase loader."""
from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile

import safetensors.torch
import torch
from modules import devices, errors, shared


def save_as_webui_torch(data, filename: str) -> None:
    """torch.save as the torch a webui ships (2.0.1 / 2.1.2) writes it: without the zip records newer torch adds
    (.format_version, .storage_alignment, ...), which the webui's own safe loader would refuse."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(filename, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if re.match(r"^[^/]+/(data\.pkl|version|data/\d+)$", info.filename):
                dst.writestr(info.filename, src.read(info))


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.cached_checksum = None
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename = None
        self.hash = None
        self.shorthash = None

    def save(self, filename: str) -> None:
        embedding_data = {"string_to_token": {"*": 265}, "string_to_param": {"*": self.vec}, "name": self.name,
                          "step": self.step, "sd_checkpoint": self.sd_checkpoint,
                          "sd_checkpoint_name": self.sd_checkpoint_name}
        save_as_webui_torch(embedding_data, filename)
        if shared.opts.save_optimizer_state and self.optimizer_state_dict is not None:
            optim = {"hash": self.checksum(), "optimizer_state_dict": self.optimizer_state_dict}
            save_as_webui_torch(optim, filename + ".optim")

    def checksum(self) -> str:
        """Four hex digits that change with the vector values."""
        if self.cached_checksum is None:
            values = (self.vec.detach().reshape(-1) * 100).to(torch.int64).cpu().numpy().tobytes()
            self.cached_checksum = hashlib.sha256(values).hexdigest()[:4]
        return self.cached_checksum

    def set_hash(self, v: str) -> None:
        self.hash = v
        self.shorthash = self.hash[0:12]


class DirWithTextualInversionEmbeddings:
    def __init__(self, path: str):
        self.path = path
        self.mtime = None

    def has_changed(self) -> bool:
        """True only when the folder's own mtime increased: overwrites and subfolder changes go unnoticed."""
        if not os.path.isdir(self.path):
            return False
        return self.mtime is None or os.path.getmtime(self.path) > self.mtime

    def update(self) -> None:
        if os.path.isdir(self.path):
            self.mtime = os.path.getmtime(self.path)


def create_embedding_from_data(data, name: str, filename: str = "unknown embedding file", filepath=None) -> Embedding:
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        emb = next(iter(params.values()))
        vec = emb.detach().to(devices.device, dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(devices.device, dtype=torch.float32) for k, v in data.items()}
        shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
        vectors = data["clip_g"].shape[0]
    elif isinstance(data, dict) and len([v for v in data.values() if isinstance(v, torch.Tensor)]) == 1:
        emb = next(v for v in data.values() if isinstance(v, torch.Tensor))
        if emb.dim() == 1:
            emb = emb.unsqueeze(0)
        vec = emb.detach().to(devices.device, dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept.")
    embedding = Embedding(vec, name)
    embedding.step = data.get("step", None)
    embedding.sd_checkpoint = data.get("sd_checkpoint", None)
    embedding.sd_checkpoint_name = data.get("sd_checkpoint_name", None)
    embedding.vectors, embedding.shape, embedding.filename = vectors, shape, filepath
    return embedding


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup: dict[int, list] = {}
        self.word_embeddings: dict[str, Embedding] = {}
        self.skipped_embeddings: dict[str, Embedding] = {}
        self.expected_shape = -1
        self.embedding_dirs: dict[str, DirWithTextualInversionEmbeddings] = {}
        self.previously_displayed_embeddings = ()

    def add_embedding_dir(self, path: str) -> None:
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def clear_embedding_dirs(self) -> None:
        self.embedding_dirs.clear()

    def register_embedding(self, embedding: Embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding: Embedding | None, model, name: str):
        """Make ``name`` resolve to ``embedding`` in prompts; ``embedding=None`` unregisters it. No shape check.

        Like the webui, a name not registered yet is appended IN PLACE to the list already under its first
        token id (then a sorted copy replaces it); a known name gets a filtered copy instead."""
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        entries = self.ids_lookup.setdefault(first_id, [])
        if name in self.word_embeddings:
            entries = [entry for entry in entries if entry[1].name != name]
        if embedding is not None:
            entries += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(entries, key=lambda entry: len(entry[0]), reverse=True)
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if not self.ids_lookup[first_id]:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def get_expected_shape(self) -> int:
        vec = shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1)
        return vec.shape[1]

    def load_from_file(self, path: str, filename: str) -> None:
        name, ext = os.path.splitext(filename)
        ext = ext.upper()
        if ext in (".PNG", ".WEBP", ".JXL", ".AVIF"):
            return  # the stand-in reads no image-embedded embeddings
        if ext in (".PT", ".BIN"):
            data = torch.load(path, map_location="cpu")  # through modules.safe: None when refused
        elif ext == ".SAFETENSORS":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            return
        embedding = create_embedding_from_data(data, name, filename=filename, filepath=path)
        with open(path, "rb") as f:
            embedding.set_hash(hashlib.sha256(f.read()).hexdigest())
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding, shared.sd_model)
        else:
            self.skipped_embeddings[name] = embedding

    def load_from_dir(self, embdir: DirWithTextualInversionEmbeddings) -> None:
        if not os.path.isdir(embdir.path):
            return
        for root, _, fns in os.walk(embdir.path, followlinks=True):
            for fn in sorted(fns):
                fullfn = os.path.join(root, fn)
                try:
                    if os.stat(fullfn).st_size == 0:
                        continue
                    self.load_from_file(fullfn, fn)
                except Exception:
                    errors.report(f"Error loading embedding {fn}", exc_info=True)

    def load_textual_inversion_embeddings(self, force_reload: bool = False) -> None:
        """Reload every folder when forced or when a folder's mtime grew; a reload drops code-registered ones."""
        if not force_reload and not any(embdir.has_changed() for embdir in self.embedding_dirs.values()):
            return
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.expected_shape = self.get_expected_shape()
        for embdir in self.embedding_dirs.values():
            self.load_from_dir(embdir)
            embdir.update()
        ordered = sorted(self.word_embeddings.values(), key=lambda e: e.name.lower())
        self.word_embeddings.clear()
        self.word_embeddings.update({e.name: e for e in ordered})

    def find_embedding_at_position(self, tokens: list[int], offset: int):
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
