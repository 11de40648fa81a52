"""modules.generation_parameters_copypaste (1.8+: also importable as modules.infotext_utils): infotext text."""
from __future__ import annotations

import json
import re

from modules import script_callbacks

re_param = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
paste_fields: dict = {}
registered_param_bindings: list = []


def quote(text) -> str:
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    """Prompt, "Negative prompt" and every "Key: value" of the last line. No callbacks run here (the PNG info
    API parses too): on_infotext_pasted runs only when a paste button fills the fields (paste_values)."""
    res: dict = {}
    lines = x.strip().split("\n")
    last = lines.pop() if lines and len(re_param.findall(lines[-1])) >= 3 else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    res["Prompt"] = "\n".join(prompt).strip()
    res["Negative prompt"] = "\n".join(negative).strip()
    for key, value in re_param.findall(last):
        res[key.strip()] = unquote(value.strip())
    return res


def paste_values(prompt: str, paste_fields: list) -> list:
    """What a paste button's handler returns: parse, run on_infotext_pasted, then one update per (component, key
    or callable) field, the value converted to the type of the component's current value ("False" is False)."""
    import gradio as gr

    params = parse_generation_parameters(prompt)
    script_callbacks.infotext_pasted_callback(prompt, params)
    updates = []
    for component, key in paste_fields:
        value = key(params) if callable(key) else params.get(key, None)
        if value is None:
            updates.append(gr.update())
        elif isinstance(value, dict) and value.get("__type__") == "update":
            updates.append(value)
        else:
            kind = type(component.value)
            try:
                updates.append(gr.update(value=False if kind is bool and value == "False" else kind(value)))
            except Exception:
                updates.append(gr.update())
    return updates


def connect_paste(button, paste_fields, input_comp, override_settings_component, tabname) -> None:
    """Wire ``button`` to fill ``paste_fields`` from the infotext in ``input_comp``."""
    button.click(fn=lambda prompt: paste_values(prompt, paste_fields), inputs=[input_comp],
                 outputs=[component for component, _ in paste_fields])


def register_paste_params_button(binding) -> None:
    registered_param_bindings.append(binding)


def add_paste_fields(tabname: str, init_img, fields, override_settings_component=None) -> None:
    paste_fields[tabname] = {"init_img": init_img, "fields": fields,
                             "override_settings_component": override_settings_component}
