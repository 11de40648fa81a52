"""Forge's modules.sd_hijack: a stub; no embedding_db, no fixes, no module-level optimisation functions."""
from __future__ import annotations


class StableDiffusionModelHijack:
    optimization_method = None

    def __init__(self):
        self.extra_generation_params: dict = {}
        self.comments: list = []

    def hijack(self, m) -> None:
        pass

    def undo_hijack(self, m) -> None:
        pass

    def apply_optimizations(self, option=None) -> None:
        pass

    def clear_comments(self) -> None:
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
