"""modules.shared_items: the module class that makes shared.sd_model a lazily loading property."""
from __future__ import annotations

import types


class Shared(types.ModuleType):
    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)
