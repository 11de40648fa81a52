"""Stand-in for modules/progress.py: task bookkeeping and POST /internal/progress."""
from __future__ import annotations

import base64
import io
import random
import string
import time
from collections import OrderedDict

from modules import shared
from modules._variant import FLAGS
from pydantic import BaseModel, Field

current_task: str | None = None
pending_tasks: OrderedDict[str, float] = OrderedDict()
finished_tasks: list[str] = []
recorded_results: list[tuple[str, object]] = []
recorded_results_limit = 2


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def record_results(id_task, res):
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        recorded_results.pop(0)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


if FLAGS.stopping_generation:  # create_task_id arrived in 1.8.0, with stop_generating
    def create_task_id(task_type):
        suffix = "".join(random.choices(string.ascii_uppercase + string.digits, k=7))
        return f"task({task_type}-{suffix})"


class ProgressRequest(BaseModel):
    id_task: str = Field(default=None)
    id_live_preview: int = Field(default=-1)
    live_preview: bool = Field(default=True)


class ProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: float = Field(default=None)
    eta: float = Field(default=None)
    live_preview: str = Field(default=None)
    id_live_preview: int = Field(default=None)
    textinfo: str = Field(default=None)


def setup_progress_api(app):
    app.add_api_route("/internal/progress", progressapi, methods=["POST"], response_model=ProgressResponse)


def _live_preview(req: ProgressRequest) -> tuple[str | None, int]:
    state = shared.state
    if not (getattr(shared.opts, "live_previews_enable", True) and req.live_preview):
        return None, req.id_live_preview
    state.set_current_image()
    if state.id_live_preview == req.id_live_preview or state.current_image is None:
        return None, req.id_live_preview
    buffer = io.BytesIO()
    state.current_image.save(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), state.id_live_preview


def progressapi(req: ProgressRequest):
    active = req.id_task == current_task
    queued = req.id_task in pending_tasks
    completed = req.id_task in finished_tasks
    if not active:
        textinfo = "Waiting..."
        if queued:
            order = sorted(pending_tasks, key=pending_tasks.get)
            textinfo = f"In queue: {order.index(req.id_task) + 1}/{len(order)}"
        return ProgressResponse(active=False, queued=queued, completed=completed, id_live_preview=-1, textinfo=textinfo)
    state = shared.state
    done = 0.0
    if state.job_count > 0:
        done += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        done += 1 / state.job_count * state.sampling_step / state.sampling_steps
    done = min(done, 1.0)
    elapsed = time.time() - (state.time_start or time.time())
    eta = elapsed / done - elapsed if done > 0 else None
    live_preview, id_live_preview = _live_preview(req)
    return ProgressResponse(active=True, queued=queued, completed=completed, progress=done, eta=eta,
                            live_preview=live_preview, id_live_preview=id_live_preview, textinfo=state.textinfo)
