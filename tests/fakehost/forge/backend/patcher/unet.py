"""backend.patcher.unet: UnetPatcher, cloned and assigned back by extensions."""
from __future__ import annotations

import copy


class UnetPatcher:
    def __init__(self, model=None):
        self.model = model
        self.model_options: dict = {"transformer_options": {}}

    def clone(self) -> UnetPatcher:
        clone = UnetPatcher(self.model)
        clone.model_options = copy.deepcopy(self.model_options)
        return clone


class ModelPatcher(UnetPatcher):
    """The patcher the memory manager loads for the text encoder and the VAE."""
