"""A training run as a webui job (a pair, or an identity): progress and previews through shared.state, stopped by
its Interrupt."""
from __future__ import annotations

import threading
from collections.abc import Callable

from modules import processing, shared

from dreamartist.config import IdentityConfig, TrainConfig
from dreamartist.errors import ModelError
from dreamartist.families import FAMILIES
from dreamartist.identity_training import IdentityTrainer
from dreamartist.images import Reference
from dreamartist.trainer import Progress, Trainer, TrainResult

from . import embeddings, host, identities
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


def training_size(config: TrainConfig | IdentityConfig) -> tuple[int, int]:
    """(width, height) for the loaded model: a width or height of 0 is its family's own size (SDXL: 1024)."""
    model = host.loaded_model()
    return config.size_for(FAMILIES[model_family(model) if model is not None else "sd1"].size)


def _trainer(config: TrainConfig | IdentityConfig, backend, references: list[Reference], on_progress) -> Trainer:
    """The run of ``config``'s mode, into its folder. A name is one word in prompts: an identity's must not be an
    embedding's, a pair's not an identity's; the identities already in its folder an identity's trainer checks itself
    (Overwrite and Resume apply to those). An identity's optional ordinary embedding goes where the webui reads it."""
    common = dict(on_progress=on_progress, should_stop=_should_stop)
    if isinstance(config, IdentityConfig):
        return IdentityTrainer(backend, config, references, identities.identities_dir(),
                               existing_names=embeddings.existing_names(), export_dir=embeddings.embeddings_dir(),
                               **common)
    return Trainer(backend, config, references, embeddings.embeddings_dir(),
                   existing_names=[*embeddings.existing_names(), *identities.names()], **common)


def run_training(config: TrainConfig | IdentityConfig, references: list[Reference],
                 on_progress: Callable[[Progress], None] | None = None) -> TrainResult:
    """Train on the loaded model: a TrainConfig's NAME / NAME-neg into the embeddings folder (then make the webui see
    them), an IdentityConfig's identity into the identities folder.

    Called inside the webui's GPU queue (the tab's wrap_gradio_gpu_call, the API's queue_lock); it does not
    take that lock itself. When no job is running (the API) it begins and ends one on shared.state.
    """
    with _training:
        host.ensure_model_loaded()
        reason = host.training_unavailable_reason()
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
            return _trainer(config, backend, references, report).run()
        finally:
            embeddings.refresh()  # also after an error: the last good pair may have been saved
            reset_cond_caches()
            if owns_job:
                state.end()
