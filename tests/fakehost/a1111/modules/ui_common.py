"""Stand-in for modules/ui_common.py: the refresh button and symbols extensions reuse."""
from __future__ import annotations

import html

import gradio as gr
from modules.ui_components import ToolButton

refresh_symbol = "\U0001f504"  # 🔄
folder_symbol = "\U0001f4c2"  # 📂


def plaintext_to_html(text, classname=None):
    lines = "<br>\n".join(html.escape(line) for line in text.split("\n"))
    return f"<p class='{classname}'>{lines}</p>" if classname else f"<p>{lines}</p>"


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    """A tool button that calls ``refresh_method`` and then updates the component(s) with ``refreshed_args``
    (a dict, or a callable returning one)."""
    components = refresh_component if isinstance(refresh_component, list) else [refresh_component]
    label = next((c.label for c in components if getattr(c, "label", None)), None)

    def refresh():
        refresh_method()
        args = refreshed_args() if callable(refreshed_args) else refreshed_args
        for key, value in args.items():
            for component in components:
                setattr(component, key, value)
        updates = [gr.update(**(args or {})) for _ in components]
        return updates if len(components) > 1 else updates[0]

    button = ToolButton(value=refresh_symbol, elem_id=elem_id, tooltip=f"{label}: refresh" if label else "Refresh")
    button.click(fn=refresh, inputs=[], outputs=components)
    return button
