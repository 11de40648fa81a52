"""The DreamArtist tab: one control per TrainConfig field, the reference inputs, Train/Interrupt and results.

Every parameter's label, help, range and default come from ``dreamartist.config``; nothing is repeated here.
The Train button follows the webui's own Train tab: a hidden task-id input filled in by
``dreamartist_start_training`` (javascript/dreamartist.js), which attaches the webui progress bar, and the
handler wrapped in ``wrap_gradio_gpu_call`` so the run holds the GPU queue and reports through shared.state.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
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
SLIDER_MAX_STOPS = 256  # integer ranges with more stops than this get a number box, not a slider
GALLERY_PREVIEWS = 16  # the latest previews of a run shown at its end (each is a full image in memory)
log = logging.getLogger("dreamartist")


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
    if field.name == "template":  # a built-in name, or the template's own lines
        return gr.Textbox(info=info, lines=1, max_lines=8, **common)
    if field.type == "str":
        return gr.Textbox(info=info, lines=1, max_lines=1, **common)
    low, high, step = meta["minimum"], meta["maximum"], meta["step"]
    if field.type == "int" and None not in (low, high, step) and (high - low) / step <= SLIDER_MAX_STOPS:
        return gr.Slider(minimum=low, maximum=high, step=step, info=info, **common)
    return gr.Number(minimum=low, maximum=high, step=step, precision=0 if field.type == "int" else None,
                     info=info, **common)


def _controls_in_rows(fields: list[dataclasses.Field]) -> dict[str, Any]:
    """One row per group of options that belong together (TrainConfig's ``group`` metadata), in field order."""
    groups: dict[str, list[dataclasses.Field]] = {}
    for field in fields:
        groups.setdefault(field.metadata["group"] or field.name, []).append(field)
    controls = {}
    for members in groups.values():
        with gr.Row():
            for field in members:
                controls[field.name] = field_control(field)
    return controls


def config_from_values(values: dict[str, Any]) -> train_config.TrainConfig:
    """A validated TrainConfig from the controls' values, matched by field name."""
    labels = {field.name: field.metadata["label"] for field in train_config.fields()}
    data = {}
    for name, value in values.items():
        if value is None:  # a cleared number box
            raise InputError(f"{labels.get(name, name)} is empty.")
        data[name] = value.strip() if isinstance(value, str) else value
    return train_config.TrainConfig.from_dict(data)


def collect_references(config: train_config.TrainConfig, image, folder: str, mask) -> list:
    """The training references from the uploaded image (with its optional mask) or from a folder or file path."""
    folder = (folder or "").strip()
    if image is not None and folder:
        raise InputError("Give either an uploaded reference image or a folder path, not both.")
    if image is not None:
        return [prepare_reference(image, *jobs.training_size(config), mask=mask)]
    if not folder:
        raise InputError("Upload a reference image or give the path of an image or a folder of images.")
    if mask is not None:
        raise InputError("An uploaded mask goes with an uploaded image; next to files on disk, "
                         "name the mask <image name>.mask.png instead.")
    return load_references(folder, *jobs.training_size(config))


def train_handler(names: list[str]):
    """The Train click handler: (task id, image, folder, mask, *field values) -> (gallery, loss plot, result line)."""
    def train(id_task, image, folder, mask, *values):
        previews: deque = deque(maxlen=GALLERY_PREVIEWS)

        def keep_preview(preview) -> None:
            if preview is not None and (not previews or preview is not previews[-1]):
                previews.append(preview)

        try:
            config = config_from_values(dict(zip(names, values, strict=True)))
            references = collect_references(config, image, folder, mask)
            result = jobs.run_training(config, references, on_progress=lambda progress: keep_preview(progress.preview))
        except DreamArtistError as e:
            return gr.update(), "", ui_render.error_html(str(e))
        except Exception as e:  # not ours: one readable line here, the traceback in the console
            log.exception("DreamArtist training failed")
            return gr.update(), "", ui_render.error_html(f"Training failed: {type(e).__name__}: {e}")
        keep_preview(result.preview)
        result_line = ui_render.result_html(
            config.name, negative_name(config.name), result.files, result.step, config.steps,
            result.final_loss, result.stopped, settings.auto_negative_default(), result.notes)
        return ui_compat.gallery_images(list(previews)), ui_render.loss_curve_html(result.losses), result_line
    return train


def resume_handler(names: list[str]):
    """Picking a saved pair fills in its name and the options it was trained with, and turns on Resume;
    clearing the choice turns Resume off."""
    def picked(name: str | None):
        if not name:
            return [gr.update(value=False) if n == "resume" else gr.update() for n in names]
        values = {**embeddings.saved_options(name), "name": name, "resume": True, "overwrite": False}
        return [gr.update(value=values[n]) if n in values else gr.update() for n in names]
    return picked


def create_tab() -> gr.Blocks:
    """Build the tab's Blocks (call inside on_ui_tabs)."""
    fields = list(train_config.fields())
    unavailable = host.host_unsupported_reason()
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                if unavailable:
                    gr.HTML(ui_render.error_html(unavailable), elem_id=elem_id("notice"))
                with gr.Row():
                    image = gr.Image(label="Reference image", type="pil", elem_id=elem_id("reference"))
                    mask = gr.Image(label="Loss-weight mask (optional): black 0x, mid-grey 1x, white 5x", type="pil",
                                    image_mode="RGBA", elem_id=elem_id("mask"))  # alpha as in mask files
                folder = gr.Textbox(label="Or a path: one image, or a folder of images of the same concept",
                                    lines=1, max_lines=1, elem_id=elem_id("folder"))
                with gr.Row():
                    resume = gr.Dropdown(label="Resume from an existing pair", choices=embeddings.saved_pairs(),
                                         elem_id=elem_id("resume_pair"))
                    ui_compat.refresh_button(resume, embeddings.saved_pairs, elem_id("resume_refresh"))
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
        names = list(controls)
        resume.change(fn=resume_handler(names), inputs=[resume], outputs=list(controls.values()))
        started = ui_compat.click(
            train, fn=call_queue.wrap_gradio_gpu_call(train_handler(names), extra_outputs=[gr.update()] * 2),
            js="dreamartist_start_training",
            inputs=[ui_compat.task_id_input(elem_id("task_id")), image, folder, mask, *controls.values()],
            outputs=[gallery, loss, result])  # the last output takes the webui's timing HTML
        # Afterwards, not as an output of the run: an output shows gradio's "processing" overlay the whole time.
        started.then(fn=lambda: gr.update(choices=embeddings.saved_pairs()), inputs=[], outputs=[resume])
        interrupt.click(fn=jobs.interrupt, inputs=[], outputs=[])
    return tab


def on_ui_tabs() -> list[tuple[gr.Blocks, str, str]]:
    return [(create_tab(), TAB_TITLE, TAB_ID)]
