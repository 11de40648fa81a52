"""Stand-in for modules/call_queue.py: the GPU queue lock and the gradio call wrappers."""
from __future__ import annotations

import html
import threading
import time
import traceback
from functools import wraps

from modules import progress, shared
from modules._variant import FLAGS


class FIFOLock:
    """The surface of the webui's modules.fifo_lock.FIFOLock (first come, first served there): acquire(blocking),
    release() and the context manager; unlike threading.Lock it has no locked()."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True) -> bool:
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc_info) -> None:
        self.release()


queue_lock = FIFOLock()  # shared with txt2img/img2img: a job holding it blocks generation


def wrap_queued_call(func):
    """Run ``func`` holding the queue lock."""
    @wraps(func)
    def queued(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return queued


def wrap_gradio_gpu_call(func, extra_outputs=None):
    """Register the task id in args[0] (when it is 'task(...)'), then run under the lock as a webui job."""
    @wraps(func)
    def gpu_call(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None
        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res
    return wrap_gradio_call(gpu_call, extra_outputs=extra_outputs, add_stats=True)


def _reset_state() -> None:
    shared.state.skipped = False
    shared.state.interrupted = False
    shared.state.job_count = 0
    if FLAGS.stopping_generation:
        shared.state.stopping_generation = False


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    """On an exception return ``extra_outputs`` plus an error div; with add_stats append timing HTML to the
    last output (which must therefore be a string)."""
    @wraps(func)
    def gradio_call(*args, **kwargs):
        started = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            traceback.print_exc()
            shared.state.job = ""
            shared.state.job_count = 0
            outputs = [None, ""] if extra_outputs is None else list(extra_outputs)
            res = outputs + [f"<div class='error'>{html.escape(type(e).__name__ + ': ' + str(e))}</div>"]
        finally:
            _reset_state()
        if add_stats:
            elapsed = time.perf_counter() - started
            res[-1] += f"<div class='performance'><p class='time'>Time taken: {elapsed:.1f} sec.</p></div>"
        return tuple(res)
    return gradio_call
