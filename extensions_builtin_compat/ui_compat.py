"""gradio 3.41 (A1111) and 4.x (Forge) differences and the webui's component helpers, behind one surface."""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import gradio as gr
from modules import ui_common, ui_components


def click(button, fn: Callable, inputs: Sequence, outputs: Sequence, js: str | None = None, **kwargs):
    """``button.click`` with an optional JS function run first in the browser (its return replaces inputs)."""
    if js is not None:  # '_js' on gradio 3 events, 'js' on gradio 4 (Forge's shim converts only some calls)
        kwargs["js" if "js" in inspect.signature(button.click).parameters else "_js"] = js
    return button.click(fn=fn, inputs=list(inputs), outputs=list(outputs), **kwargs)


def tool_button(symbol: str, elem_id: str, tooltip: str):
    """The webui's small square symbol button."""
    return ui_components.ToolButton(value=symbol, elem_id=elem_id, tooltip=tooltip)


def refresh_button(dropdown, choices: Callable[[], list[str]], elem_id: str):
    """The webui's refresh button next to ``dropdown``: reloads its choices from ``choices()``."""
    return ui_common.create_refresh_button(dropdown, lambda: None, lambda: {"choices": choices()}, elem_id)


def input_accordion(value: bool, label: str, elem_id: str):
    """A checkbox-backed accordion (a class in A1111, a factory function in Forge: never isinstance it)."""
    return ui_components.InputAccordion(value, label=label, elem_id=elem_id)


def task_id_input():
    """The hidden component whose value the JS replaces with the task id (a Textbox works on both gradios)."""
    return gr.Textbox(visible=False, elem_id="dreamartist_task_id")
