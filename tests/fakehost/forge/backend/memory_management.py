"""backend.memory_management: nothing to move on a CPU test host."""


def load_model_gpu(model) -> None:
    pass


def load_models_gpu(models) -> None:
    pass


def unload_all_models() -> None:
    pass


def soft_empty_cache(force: bool = False) -> None:
    pass
