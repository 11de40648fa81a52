"""reForge's ldm_patched ModelPatcher, as far as the webui meets it: clones share one model, a clone carries weight
patches (a LoRA) that are merged into the shared weights when it loads (a new Parameter per patched weight, the old
one kept as its backup) and taken out again when a clone of the same model loads instead."""
from __future__ import annotations

import torch


def _owner(root: torch.nn.Module, key: str) -> tuple[torch.nn.Module, str]:
    *path, name = key.split(".")
    for part in path:
        root = getattr(root, part)
    return root, name


class ModelPatcher:
    def __init__(self, model: torch.nn.Module, patches: dict | None = None, parent=None):
        self.model = model
        self.patches = dict(patches or {})  # parameter key -> delta added to the weight
        self.parent = parent
        self.backup: dict[str, torch.nn.Parameter] = {}

    def clone(self) -> ModelPatcher:
        return ModelPatcher(self.model, self.patches, parent=self)

    def is_clone(self, other) -> bool:
        return getattr(other, "model", None) is self.model

    def add_patches(self, deltas: dict) -> None:
        self.patches.update(deltas)

    def patch_model(self) -> None:
        for key, delta in self.patches.items():
            owner, name = _owner(self.model, key)
            weight = owner._parameters[name]
            self.backup[key] = weight
            owner._parameters[name] = torch.nn.Parameter(weight + delta, requires_grad=False)

    def unpatch_model(self) -> None:
        for key, weight in self.backup.items():
            owner, name = _owner(self.model, key)
            owner._parameters[name] = weight
        self.backup.clear()
