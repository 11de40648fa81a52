"""gradio 3.41 (A1111) and 4.x (Forge) differences and the webui's component helpers, behind one surface."""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence

import gradio as gr
from modules import shared, ui_components


def click(button, fn: Callable, inputs: Sequence, outputs: Sequence, js: str | None = None, **kwargs):
    """``button.click`` with an optional JS function run first in the browser (its return replaces inputs)."""
    if js is not None:  # '_js' on gradio 3, 'js' on gradio 4 (Forge's event wrappers turn '_js' into 'js')
        kwargs["js" if "js" in inspect.signature(button.click).parameters else "_js"] = js
    return button.click(fn=fn, inputs=list(inputs), outputs=list(outputs), **kwargs)


REFRESH_SYMBOL = "\u21bb"  # a clockwise arrow every text font has (the webui's emoji needs an emoji font)


def refresh_button(dropdown, choices: Callable[[], list[str]], elem_id: str):
    """A tool button beside ``dropdown``, styled as the webui's own, that sets its choices to ``choices()``."""
    button = ui_components.ToolButton(value=REFRESH_SYMBOL, elem_id=elem_id)
    button.click(fn=lambda: gr.update(choices=choices()), inputs=[], outputs=[dropdown])
    return button


def task_id_input(elem_id: str):
    """The hidden input whose value the JS replaces with the task id (A1111 uses a Label, Forge a Textbox;
    a Textbox works on both gradios)."""
    return gr.Textbox(visible=False, elem_id=elem_id)


def gallery_images(images: list) -> list:
    """``images`` for a Gallery, with the folder the webui saves unsaved images into made first: Forge Neo's default
    (<webui>/tmp) is only created when that setting changes, so any gallery of new images failed on a fresh Neo."""
    folder = getattr(shared.opts, "temp_dir", "")
    if images and folder:
        os.makedirs(folder, exist_ok=True)
    return images
