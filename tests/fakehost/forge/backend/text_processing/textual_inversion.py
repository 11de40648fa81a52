"""backend.text_processing.textual_inversion: one embedding database per text engine, filled when the engine is
built; its reload takes no arguments and always rereads every folder."""
from __future__ import annotations

import os

import safetensors.torch
import torch


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec, self.name, self.step = vec, name, step
        self.shape = None
        self.vectors = 0
        self.filename = None


class DirWithTextualInversionEmbeddings:
    def __init__(self, path: str):
        self.path = path
        self.mtime = None

    def update(self) -> None:
        if os.path.isdir(self.path):
            self.mtime = os.path.getmtime(self.path)


class EmbeddingDatabase:
    def __init__(self, tokenizer, expected_shape: int = -1):
        self.ids_lookup: dict[int, list] = {}
        self.word_embeddings: dict[str, Embedding] = {}
        self.embedding_dirs: dict[str, DirWithTextualInversionEmbeddings] = {}
        self.skipped_embeddings: dict[str, Embedding] = {}
        self.expected_shape = expected_shape
        self.tokenizer = tokenizer
        self.fixes = []

    def add_embedding_dir(self, path: str) -> None:
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def clear_embedding_dirs(self) -> None:
        self.embedding_dirs.clear()

    def register_embedding(self, embedding: Embedding) -> Embedding:
        ids = self.tokenizer([embedding.name], truncation=False, add_special_tokens=False)["input_ids"][0]
        lookup = [e for e in self.ids_lookup.get(ids[0], []) if e[1].name != embedding.name] + [(ids, embedding)]
        self.ids_lookup[ids[0]] = sorted(lookup, key=lambda e: len(e[0]), reverse=True)
        self.word_embeddings[embedding.name] = embedding
        return embedding

    def load_from_file(self, path: str, filename: str) -> None:
        name, ext = os.path.splitext(filename)
        if ext.lower() in (".pt", ".bin"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif ext.lower() == ".safetensors":
            data = safetensors.torch.load_file(path)
        else:
            return  # the stand-in reads no image-embedded embeddings
        if "clip_l" in data and "clip_g" in data:  # SDXL: both tensors, the widths summed as its shape
            vec = {key: data[key].float() for key in ("clip_l", "clip_g")}
            shape, vectors = vec["clip_l"].shape[-1] + vec["clip_g"].shape[-1], vec["clip_g"].shape[0]
        else:
            vec = (next(iter(data["string_to_param"].values())) if "string_to_param" in data else next(
                v for v in data.values() if isinstance(v, torch.Tensor))).float()
            shape, vectors = vec.shape[-1], vec.shape[0]
        embedding = Embedding(vec, name)
        embedding.shape, embedding.vectors, embedding.filename = shape, vectors, path
        if self.expected_shape in (-1, embedding.shape):
            self.register_embedding(embedding)
        else:
            self.skipped_embeddings[name] = embedding

    def load_from_dir(self, embdir: DirWithTextualInversionEmbeddings) -> None:
        if not os.path.isdir(embdir.path):
            return
        for root, _, files in os.walk(embdir.path, followlinks=True):
            for filename in sorted(files):
                path = os.path.join(root, filename)
                if os.stat(path).st_size:
                    self.load_from_file(path, filename)

    def load_textual_inversion_embeddings(self) -> None:
        """Reread every folder, whatever its mtime (Forge calls it when an engine is built)."""
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        for embdir in self.embedding_dirs.values():
            self.load_from_dir(embdir)
            embdir.update()

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
