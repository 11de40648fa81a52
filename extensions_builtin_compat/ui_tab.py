"""The DreamArtist tab: one control per TrainConfig field, the reference inputs, Train/Interrupt and results.

Every parameter's label, help, range and default come from ``dreamartist.config``; nothing is repeated here.
The Train button follows the webui's own Train tab: a hidden task-id input filled in by
``dreamartist_start_training`` (javascript/dreamartist.js), which attaches the webui progress bar, and the
handler wrapped in ``wrap_gradio_gpu_call`` so the run holds the GPU queue and reports through shared.state.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr
from modules import call_queue

from dreamartist import config as train_config
from dreamartist.errors import DreamArtistError, InputError
from dreamartist.images import load_references, prepare_reference
from dreamartist.names import negative_name

from . import embeddings, host, jobs, settings, ui_compat, ui_render

TAB_TITLE = "DreamArtist"
TAB_ID = "dreamartist"
SLIDER_MAX_STOPS = 2048  # integer ranges with more stops than this get a number box, not a slider
REFRESH_SYMBOL = "\U0001f504"  # 🔄


def elem_id(item: str) -> str:
    """Every DOM id of the tab, from one pattern (style.css and dreamartist.js rely on it)."""
    return f"{TAB_ID}_{item}"


def field_control(field: dataclasses.Field):
    """The gradio control for one TrainConfig field, built from its metadata."""
    meta = field.metadata
    common = dict(label=meta["label"], value=field.default, elem_id=elem_id(field.name))
    info = meta["help"] or None
    if field.type == "bool":
        return gr.Checkbox(info=info, **common)
    if meta["choices"]:
        return gr.Dropdown(choices=list(meta["choices"]), info=info, **common)
    if field.type == "str":
        return gr.Textbox(info=info, lines=1, max_lines=1, **common)
    low, high, step = meta["minimum"], meta["maximum"], meta["step"]
    if field.type == "int" and None not in (low, high, step) and (high - low) / step <= SLIDER_MAX_STOPS:
        return gr.Slider(minimum=low, maximum=high, step=step, info=info, **common)
    return gr.Number(minimum=low, maximum=high, step=step, precision=0 if field.type == "int" else None,
                     info=info, **common)


def _controls_in_rows(fields: list[dataclasses.Field], per_row: int = 2) -> dict[str, Any]:
    controls = {}
    for start in range(0, len(fields), per_row):
        with gr.Row():
            for field in fields[start:start + per_row]:
                controls[field.name] = field_control(field)
    return controls


def config_from_values(values: dict[str, Any]) -> train_config.TrainConfig:
    """A validated TrainConfig from the controls' values, matched by field name."""
    data = {name: value for name, value in values.items() if value is not None}
    for name in ("name", "init_words", "gamma", "template"):
        if isinstance(data.get(name), str):
            data[name] = data[name].strip()
    return train_config.TrainConfig.from_dict(data)


def collect_references(config: train_config.TrainConfig, image, folder: str, mask) -> list:
    """The training references from the uploaded image (with its optional mask) or from a folder or file path."""
    folder = (folder or "").strip()
    if image is not None and folder:
        raise InputError("Give either an uploaded reference image or a folder path, not both.")
    if image is not None:
        return [prepare_reference(image, config.width, config.height, mask=mask)]
    if not folder:
        raise InputError("Upload a reference image or give the path of an image or a folder of images.")
    if mask is not None:
        raise InputError("An uploaded mask goes with an uploaded image; next to files on disk, "
                         "name the mask <image name>.mask.png instead.")
    return load_references(folder, config.width, config.height)


def train_handler(names: list[str]):
    """The Train click handler: (task id, image, folder, mask, *field values) -> (gallery, loss, result)."""
    def train(id_task, image, folder, mask, *values):
        previews = []

        def on_progress(progress) -> None:
            if progress.preview is not None and (not previews or progress.preview is not previews[-1]):
                previews.append(progress.preview)

        try:
            config = config_from_values(dict(zip(names, values)))
            references = collect_references(config, image, folder, mask)
            result = jobs.run_training(config, references, on_progress=on_progress)
        except DreamArtistError as e:
            return gr.update(), "", ui_render.error_html(str(e))
        if result.preview is not None and (not previews or result.preview is not previews[-1]):
            previews.append(result.preview)
        result_line = ui_render.result_html(
            config.name, negative_name(config.name), result.files, result.step, config.steps,
            result.final_loss, result.stopped, settings.auto_negative_default())
        return previews or gr.update(), ui_render.loss_curve_html(result.losses), result_line
    return train


def _pair_choices() -> list[str]:
    return sorted(embeddings.pairs())


def _resume_picked(name: str | None):
    """Picking a saved pair fills in its name and turns on resume; clearing the choice turns it off."""
    if not name:
        return gr.update(), gr.update(value=False)
    return gr.update(value=name), gr.update(value=True)


def create_tab() -> gr.Blocks:
    """Build the tab's Blocks (call inside on_ui_tabs)."""
    fields = list(train_config.fields())
    unavailable = host.training_unavailable_reason()
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                if unavailable:
                    gr.HTML(ui_render.error_html(unavailable), elem_id=elem_id("notice"))
                with gr.Row():
                    image = gr.Image(label="Reference image", type="pil", elem_id=elem_id("reference"))
                    mask = gr.Image(label="Loss-weight mask (optional; white = more weight)", type="pil",
                                    image_mode="L", elem_id=elem_id("mask"))
                folder = gr.Textbox(label="Or a path: one image, or a folder of images of the same concept",
                                    lines=1, max_lines=1, elem_id=elem_id("folder"))
                with gr.Row():
                    resume = gr.Dropdown(label="Resume from an existing pair", choices=_pair_choices(),
                                         elem_id=elem_id("resume_pair"))
                    ui_compat.refresh_button(resume, _pair_choices, elem_id("resume_refresh"))
                controls = _controls_in_rows([f for f in fields if not f.metadata["advanced"]])
                with gr.Accordion("Advanced", open=False, elem_id=elem_id("advanced")):
                    controls.update(_controls_in_rows([f for f in fields if f.metadata["advanced"]]))
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id=elem_id("interrupt"))
                    train = gr.Button("Train", variant="primary", elem_id=elem_id("train"),
                                      interactive=not unavailable)
            with gr.Column():
                result = gr.HTML(elem_id=elem_id("result"))
                gr.HTML(elem_id=elem_id("progress"))  # filled from the progress API by dreamartist.js
                gallery = gr.Gallery(label="Previews", columns=4, object_fit="contain", elem_id=elem_id("gallery"))
                loss = gr.HTML(elem_id=elem_id("loss"))
        resume.change(fn=_resume_picked, inputs=[resume], outputs=[controls["name"], controls["resume"]])
        names = list(controls)
        ui_compat.click(
            train, fn=call_queue.wrap_gradio_gpu_call(train_handler(names), extra_outputs=[gr.update(), ""]),
            js="dreamartist_start_training",
            inputs=[ui_compat.task_id_input(), image, folder, mask, *controls.values()],
            outputs=[gallery, loss, result])
        interrupt.click(fn=jobs.interrupt, inputs=[], outputs=[])
    return tab


def on_ui_tabs() -> list[tuple[gr.Blocks, str, str]]:
    return [(create_tab(), TAB_TITLE, TAB_ID)]
