"""modules.shared_state: State, the progress and interrupt record of the running job."""
from __future__ import annotations

import time

from modules._variant import FLAGS


class State:
    skipped = False
    interrupted = False
    if FLAGS.stopping_generation:
        stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None

    def __init__(self):
        self.server_start = time.time()

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self) -> dict:
        return {"skipped": self.skipped, "interrupted": self.interrupted, "job": self.job,
                "job_count": self.job_count, "job_timestamp": self.job_timestamp, "job_no": self.job_no,
                "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def begin(self, job: str = "(unknown)") -> None:
        self.sampling_step = 0
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        if FLAGS.stopping_generation:
            self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.time_start = time.time()

    def end(self) -> None:
        self.job = ""
        self.job_count = 0

    def set_current_image(self) -> None:
        """Previews from latents are not rendered by the stand-in."""

    def assign_current_image(self, image) -> None:
        self.current_image = image
        self.id_live_preview += 1

    if FLAGS.stopping_generation:
        def stop_generating(self) -> None:
            self.stopping_generation = True
