"""A training run as a webui job: progress and previews through shared.state, stopped by its Interrupt."""
from __future__ import annotations

import threading
from collections.abc import Callable

from modules import processing, shared

from dreamartist.config import TrainConfig
from dreamartist.errors import ModelError
from dreamartist.families import FAMILIES
from dreamartist.images import Reference
from dreamartist.trainer import Progress, TrainResult, train

from . import embeddings, host
from .host_backend import model_family
from .host_backend_sdxl import backend_for

JOB_NAME = "dreamartist-train"
_training = threading.Lock()  # one training at a time; a second waits for the first
_COND_CACHES = ((processing.StableDiffusionProcessing, "cached_c"), (processing.StableDiffusionProcessing, "cached_uc"),
                (processing.StableDiffusionProcessingTxt2Img, "cached_hr_c"),
                (processing.StableDiffusionProcessingTxt2Img, "cached_hr_uc"))


def reset_cond_caches() -> None:
    """Forget cached prompt conds: their key holds the prompt text, not the embedding values."""
    for cls, name in _COND_CACHES:
        cache = getattr(cls, name, None)
        if isinstance(cache, list):
            cache[:] = [None] * len(cache)


def interrupt() -> None:
    shared.state.interrupt()


def _should_stop() -> bool:
    state = shared.state
    return bool(state.interrupted or getattr(state, "stopping_generation", False))


def _report(progress: Progress) -> None:
    state = shared.state
    state.job_no = progress.step
    state.job_count = progress.total
    state.textinfo = (f"DreamArtist: step {progress.step}/{progress.total}, loss {progress.loss:.5f}, "
                      f"about {int(progress.eta_seconds)} s left")
    if progress.preview is not None:
        state.assign_current_image(progress.preview)


def training_size(config: TrainConfig) -> tuple[int, int]:
    """(width, height) for the loaded model: a width or height of 0 is its family's own size (SDXL: 1024)."""
    model = host.loaded_model()
    return config.size_for(FAMILIES[model_family(model) if model is not None else "sd1"].size)


def run_training(config: TrainConfig, references: list[Reference],
                 on_progress: Callable[[Progress], None] | None = None) -> TrainResult:
    """Train NAME / NAME-neg on the loaded model into the embeddings folder, then make the webui see them.

    Called inside the webui's GPU queue (the tab's wrap_gradio_gpu_call, the API's queue_lock); it does not
    take that lock itself. When no job is running (the API) it begins and ends one on shared.state.
    """
    with _training:
        host.ensure_model_loaded()
        reason = host.training_unavailable_reason() or host.adapters_unsupported_reason(config.adapters)
        if reason:
            raise ModelError(reason)
        backend = backend_for()
        state = shared.state
        owns_job = not state.job
        if owns_job:
            state.begin(job=JOB_NAME)
        state.job_count, state.job_no, state.sampling_step, state.sampling_steps = config.steps, 0, 0, 0
        state.textinfo = "DreamArtist: preparing"

        def report(progress: Progress) -> None:
            _report(progress)
            if on_progress is not None:
                on_progress(progress)

        try:
            return train(backend, config, references, embeddings.embeddings_dir(), on_progress=report,
                         should_stop=_should_stop, existing_names=embeddings.existing_names())
        finally:
            embeddings.refresh()  # also after an error: the last good pair may have been saved
            reset_cond_caches()
            if owns_job:
                state.end()
