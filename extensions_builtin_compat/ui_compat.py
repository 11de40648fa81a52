"""gradio 3.41 (A1111) and 4.x (Forge) differences and the webui's component helpers, behind one surface."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import gradio as gr
from modules import ui_common


def click(button, fn: Callable, inputs: Sequence, outputs: Sequence, js: str | None = None, **kwargs):
    """``button.click`` with an optional JS function run first in the browser (its return replaces inputs)."""
    if js is not None:  # '_js' on gradio 3, 'js' on gradio 4 (Forge's event wrappers turn '_js' into 'js')
        kwargs["js" if "js" in inspect.signature(button.click).parameters else "_js"] = js
    return button.click(fn=fn, inputs=list(inputs), outputs=list(outputs), **kwargs)


def refresh_button(dropdown, refresh: Callable[[], None], choices: Callable[[], list[str]], elem_id: str):
    """The webui's refresh button next to ``dropdown``: runs ``refresh()``, then sets the choices to ``choices()``."""
    return ui_common.create_refresh_button(dropdown, refresh, lambda: {"choices": choices()}, elem_id)


def task_id_input(elem_id: str):
    """The hidden input whose value the JS replaces with the task id (A1111 uses a Label, Forge a Textbox;
    a Textbox works on both gradios)."""
    return gr.Textbox(visible=False, elem_id=elem_id)
