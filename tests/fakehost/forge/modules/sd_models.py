"""Forge's modules.sd_models: the model is loaded lazily at the first generation, inside inference mode."""
from __future__ import annotations

import hashlib

import torch
from modules import script_callbacks
from modules._variant import FLAGS


class CheckpointInfo:
    def __init__(self, filename: str):
        self.filename = filename
        self.name = self.name_for_extra = self.model_name = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        self.sha256 = hashlib.sha256(filename.encode()).hexdigest()
        self.hash, self.shorthash = self.sha256[:8], self.sha256[:10]
        self.title = self.short_title = f"{self.name} [{self.shorthash}]"
        self.metadata = {}

    def calculate_shorthash(self) -> str:
        return self.shorthash


class FakeInitialModel:
    """Neo's stand-in before the first generation loads a model (and after "unload"): no model part at all."""

    @property
    def first_stage_model(self):
        return None

    @property
    def cond_stage_model(self):
        return None


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel() if FLAGS.placeholder_model else None
        self.loaded_sd_models: list = []
        self.loader = None  # the test host sets how a model is built at the first generation

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v) -> None:
        self.sd_model = v


model_data = SdModelData()


@torch.inference_mode()
def load_model(model, half: bool = False, checkpoint: str = "models/Stable-diffusion/tiny-test.safetensors"):
    """What forge_model_reload does for the stand-in: checkpoint info, on_model_loaded (the engines read the
    embeddings when they were built)."""
    model.sd_checkpoint_info = CheckpointInfo(checkpoint)
    model.sd_model_hash = model.sd_checkpoint_info.calculate_shorthash()
    model.filename = checkpoint
    model_data.set_sd_model(model)
    script_callbacks.model_loaded_callback(model)
    return model


def forge_model_reload():
    """Load the model at the first generation (shared.sd_model is None until then)."""
    if isinstance(model_data.sd_model, (type(None), FakeInitialModel)) and model_data.loader is not None:
        load_model(model_data.loader())
    return model_data.sd_model
