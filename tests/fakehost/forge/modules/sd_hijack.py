"""Forge's modules.sd_hijack: a stub whose methods do nothing; no embedding_db, fixes, optimization_method,
extra_generation_params, nor module-level optimisation functions."""
from __future__ import annotations


class StableDiffusionModelHijack:
    def apply_optimizations(self, option=None) -> None:
        pass

    def hijack(self, m) -> None:
        pass

    def undo_hijack(self, m) -> None:
        pass

    def apply_circular(self, enable) -> None:
        pass

    def clear_comments(self) -> None:
        pass

    def redo_hijack(self, m) -> None:
        pass


model_hijack = StableDiffusionModelHijack()
