"""modules.script_callbacks: on_* registration (``name=`` only from 1.9) and invokers that report, never raise."""
from __future__ import annotations

import inspect
import os
from collections import namedtuple

from modules import errors
from modules._variant import FLAGS

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])

CATEGORIES = ["app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved",
              "image_saved", "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component",
              "after_component", "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload",
              "list_optimizers", "list_unets"] + (["before_token_counter"] if FLAGS.infotext_utils else [])
callback_map = {f"callbacks_{category}": [] for category in CATEGORIES}


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond = text_cond, text_uncond
        if FLAGS.cfg_params_denoiser:
            self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = (
            x, sampling_step, total_sampling_steps, inner_model)


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


class UiTrainTabParams:
    def __init__(self, txt2img_preview_params):
        self.txt2img_preview_params = txt2img_preview_params


def _caller_file(depth: int) -> str:
    frame = inspect.currentframe()
    for _ in range(depth + 1):
        frame = frame.f_back
    return frame.f_code.co_filename


def _callback_name(script: str, category: str, name: str | None) -> str:
    folder = os.path.dirname(script)
    owner = os.path.basename(os.path.dirname(folder)).lower() if os.path.basename(folder) == "scripts" else "base"
    base = f"{owner}/{os.path.basename(script)}/{category}" + (f"/{name}" if name else "")
    taken = {c.name for callbacks in callback_map.values() for c in callbacks}
    unique, suffix = base, 0
    while unique in taken:
        suffix += 1
        unique = f"{base}-{suffix}"
    return unique


def add_callback(callbacks: list, fun, *, name=None, category="unknown", script=None) -> None:
    script = script or _caller_file(1)
    unique_name = _callback_name(script, category, name) if FLAGS.callback_name_kw else None
    callbacks.append(ScriptCallback(script, fun, unique_name))


def _registrar(category: str):
    if FLAGS.callback_name_kw:
        def register(callback, *, name=None):
            add_callback(callback_map[f"callbacks_{category}"], callback, name=name, category=category,
                         script=_caller_file(1))
    else:
        def register(callback):
            add_callback(callback_map[f"callbacks_{category}"], callback, category=category, script=_caller_file(1))
    register.__name__ = f"on_{category}"
    return register


for _category in CATEGORIES:
    globals()["on_before_reload" if _category == "on_reload" else f"on_{_category}"] = _registrar(_category)


def _invoke(category: str, *args, reverse: bool = False, **kwargs) -> list:
    results = []
    callbacks = callback_map[f"callbacks_{category}"]
    for c in reversed(callbacks) if reverse else list(callbacks):
        try:
            results.append(c.callback(*args, **kwargs))
        except Exception:
            errors.report(f"Error executing callback {c.name or c.script} for {category}", exc_info=True)
    return results


def clear_callbacks() -> None:
    for callbacks in callback_map.values():
        callbacks.clear()


def remove_current_script_callbacks() -> None:
    script = _caller_file(1)
    for callbacks in callback_map.values():
        callbacks[:] = [c for c in callbacks if c.script != script]


def remove_callbacks_for_function(callback_func) -> None:
    for callbacks in callback_map.values():
        callbacks[:] = [c for c in callbacks if c.callback != callback_func]


def app_started_callback(demo, app):
    _invoke("app_started", demo, app)


def app_reload_callback():
    _invoke("on_reload")


def model_loaded_callback(sd_model):
    _invoke("model_loaded", sd_model)


def ui_tabs_callback() -> list:
    return [tab for result in _invoke("ui_tabs") for tab in (result or [])]


def ui_train_tabs_callback(params: UiTrainTabParams):
    _invoke("ui_train_tabs", params)


def ui_settings_callback():
    _invoke("ui_settings")


def before_ui_callback():
    _invoke("before_ui")


def before_image_saved_callback(params: ImageSaveParams):
    _invoke("before_image_saved", params)


def image_saved_callback(params: ImageSaveParams):
    _invoke("image_saved", params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _invoke("cfg_denoiser", params)


def cfg_denoised_callback(params: CFGDenoisedParams):
    _invoke("cfg_denoised", params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams):
    _invoke("cfg_after_cfg", params)


def before_component_callback(component, **kwargs):
    _invoke("before_component", component, **kwargs)


def after_component_callback(component, **kwargs):
    _invoke("after_component", component, **kwargs)


def infotext_pasted_callback(infotext: str, params: dict):
    _invoke("infotext_pasted", infotext, params)


def script_unloaded_callback():
    _invoke("script_unloaded", reverse=True)


def list_optimizers_callback() -> list:
    res: list = []
    _invoke("list_optimizers", res)
    return res
