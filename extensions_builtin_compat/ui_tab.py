"""The DreamArtist tab: two sides, pairs (TrainConfig) and identities (IdentityConfig), each with one control per
option field, its reference inputs, Train/Interrupt and results.

Every parameter's label, help, range and default come from ``dreamartist.config``; nothing is repeated here.
The Train button follows the webui's own Train tab: a hidden task-id input filled in by
``dreamartist_start_training`` (javascript/dreamartist.js), which attaches the webui progress bar, and the
handler wrapped in ``wrap_gradio_gpu_call`` so the run holds the GPU queue and reports through shared.state.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import gradio as gr
from modules import call_queue

from dreamartist import config as train_config
from dreamartist.errors import DreamArtistError, InputError
from dreamartist.images import face_reference, load_references, prepare_reference
from dreamartist.names import negative_name

from . import embeddings, host, identities, jobs, settings, ui_compat, ui_render
from .face_detection import face_region

TAB_TITLE = "DreamArtist"
TAB_ID = "dreamartist"
SLIDER_MAX_STOPS = 256  # integer ranges with more stops than this get a number box, not a slider
GALLERY_PREVIEWS = 16  # the latest previews of a run shown at its end (each is a full image in memory)
CONSENT = ("Train identities only of people who agreed to it, and do not use them to impersonate or mislead "
           "anyone.")
IDENTITY_PREFIX = "identity_"  # the identity side's elem_ids: dreamartist_identity_<item>
log = logging.getLogger("dreamartist")


def elem_id(item: str) -> str:
    """Every DOM id of the tab, from one pattern (style.css and dreamartist.js rely on it)."""
    return f"{TAB_ID}_{item}"


def field_control(field: dataclasses.Field, prefix: str = ""):
    """The gradio control for one option field, built from its metadata; ``prefix`` starts the item of its elem_id."""
    meta = field.metadata
    common = dict(label=meta["label"], value=field.default, elem_id=elem_id(prefix + field.name))
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


def _controls_in_rows(fields: list[dataclasses.Field], prefix: str = "") -> dict[str, Any]:
    """One row per group of options that belong together (the fields' ``group`` metadata), in field order."""
    groups: dict[str, list[dataclasses.Field]] = {}
    for field in fields:
        groups.setdefault(field.metadata["group"] or field.name, []).append(field)
    controls = {}
    for members in groups.values():
        with gr.Row():
            for field in members:
                controls[field.name] = field_control(field, prefix)
    return controls


def config_from_values(values: dict[str, Any], config_class: type = train_config.TrainConfig):
    """A validated ``config_class`` (TrainConfig or IdentityConfig) from the controls' values, matched by field name."""
    labels = {field.name: field.metadata["label"] for field in dataclasses.fields(config_class)}
    data = {}
    for name, value in values.items():
        if value is None:  # a cleared number box
            raise InputError(f"{labels.get(name, name)} is empty.")
        data[name] = value.strip() if isinstance(value, str) else value
    return config_class.from_dict(data)


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


def face_references(config: train_config.IdentityConfig, image, mask) -> list:
    """Identity mode's one reference: the uploaded face photo framed around the face region its mask paints white, or
    around the face found in it when no mask is given."""
    if image is None:
        raise InputError("Upload a photo of the face to train the identity on.")
    return [face_reference(image, face_region(image, mask), *jobs.training_size(config))]


def pair_result(config: train_config.TrainConfig, result) -> str:
    return ui_render.result_html(config.name, negative_name(config.name), result.files, result.step, config.steps,
                                 result.final_loss, result.stopped, settings.auto_negative_default(), result.notes)


def identity_result(config: train_config.IdentityConfig, result) -> str:
    return ui_render.identity_result_html(config.name, result.files, result.step, config.steps, result.final_loss,
                                          result.stopped, result.notes)


def train_handler(names: list[str], mode: Mode):
    """The Train click handler: (task id, *reference inputs, *field values) -> (gallery, loss plot, result line);
    the reference inputs are the pair side's (image, folder, mask) or the identity side's (image, mask)."""
    def train(id_task, *inputs):
        previews: deque = deque(maxlen=GALLERY_PREVIEWS)

        def keep_preview(preview) -> None:
            if preview is not None and (not previews or preview is not previews[-1]):
                previews.append(preview)

        reference_inputs, values = inputs[:mode.input_count], inputs[mode.input_count:]
        try:
            config = config_from_values(dict(zip(names, values, strict=True)), mode.config_class)
            references = mode.references(config, *reference_inputs)
            result = jobs.run_training(config, references, on_progress=lambda progress: keep_preview(progress.preview))
        except DreamArtistError as e:
            return gr.update(), "", ui_render.error_html(str(e))
        except Exception as e:  # not ours: one readable line here, the traceback in the console
            log.exception("DreamArtist training failed")
            return gr.update(), "", ui_render.error_html(f"Training failed: {type(e).__name__}: {e}")
        keep_preview(result.preview)
        return (ui_compat.gallery_images(list(previews)), ui_render.loss_curve_html(result.losses),
                mode.result(config, result))
    return train


def resume_handler(names: list[str], saved_options: Callable[[str], dict]):
    """Picking a saved pair (or identity) fills in its name and the options it was trained with, and turns on Resume;
    clearing the choice turns Resume off."""
    def picked(name: str | None):
        if not name:
            return [gr.update(value=False) if n == "resume" else gr.update() for n in names]
        values = {**saved_options(name), "name": name, "resume": True, "overwrite": False}
        return [gr.update(value=values[n]) if n in values else gr.update() for n in names]
    return picked


def _pair_inputs() -> list:
    with gr.Row():
        image = gr.Image(label="Reference image", type="pil", elem_id=elem_id("reference"))
        mask = gr.Image(label="Loss-weight mask (optional): black 0x, mid-grey 1x, white 5x", type="pil",
                        image_mode="RGBA", elem_id=elem_id("mask"))  # alpha as in mask files
    folder = gr.Textbox(label="Or a path: one image, or a folder of images of the same concept",
                        lines=1, max_lines=1, elem_id=elem_id("folder"))
    return [image, folder, mask]


def _identity_inputs() -> list:
    gr.Markdown(CONSENT, elem_id=elem_id(IDENTITY_PREFIX + "consent"))
    with gr.Row():
        image = gr.Image(label="Face photo", type="pil", elem_id=elem_id(IDENTITY_PREFIX + "reference"))
        mask = gr.Image(label="Face region: paint the face white, the rest black (left empty: the face found in "
                        "the photo)", type="pil",
                        image_mode="RGBA", elem_id=elem_id(IDENTITY_PREFIX + "mask"))
    return [image, mask]


@dataclasses.dataclass(frozen=True)
class Mode:
    """What differs between the tab's sides: the options, the elem_id prefix, the reference inputs and how their
    values become references, the saved runs to resume, the result line, and the JS run before Train."""
    config_class: type
    prefix: str
    inputs: Callable[[], list]  # builds the reference inputs (inside the Blocks)
    input_count: int
    references: Callable[..., list]  # (config, *reference input values) -> references
    resume_item: str
    resume_label: str
    saved: Callable[[], list[str]]
    saved_options: Callable[[str], dict]
    result: Callable[[Any, Any], str]  # (config, TrainResult) -> HTML
    js: str


PAIR = Mode(train_config.TrainConfig, "", _pair_inputs, 3, collect_references, "resume_pair",
            "Resume from an existing pair", embeddings.saved_pairs, embeddings.saved_options, pair_result,
            "dreamartist_start_training")
IDENTITY = Mode(train_config.IdentityConfig, IDENTITY_PREFIX, _identity_inputs, 2, face_references, "resume_identity",
                "Resume from an existing identity", identities.saved_names, identities.saved_options, identity_result,
                "dreamartist_start_identity_training")


def _side(mode: Mode, unavailable: str | None) -> None:
    """One side of the tab, its controls and events (inside the Blocks being built)."""
    def eid(item: str) -> str:
        return elem_id(mode.prefix + item)

    fields = dataclasses.fields(mode.config_class)
    with gr.Row(equal_height=False):
        with gr.Column(variant="panel"):
            if unavailable:
                gr.HTML(ui_render.error_html(unavailable), elem_id=eid("notice"))
            inputs = mode.inputs()
            with gr.Row():
                resume = gr.Dropdown(label=mode.resume_label, choices=mode.saved(), elem_id=eid(mode.resume_item))
                ui_compat.refresh_button(resume, mode.saved, eid("resume_refresh"))
            controls = _controls_in_rows([f for f in fields if not f.metadata["advanced"]], mode.prefix)
            with gr.Accordion("Advanced", open=False, elem_id=eid("advanced")):
                controls.update(_controls_in_rows([f for f in fields if f.metadata["advanced"]], mode.prefix))
            if mode.prefix:
                # The webui's ui-config.json keys a control by tab and label, which the sides share ("Learning
                # rate"): the pair side's saved values would replace this side's own defaults.
                for control in controls.values():
                    control.do_not_save_to_config = True
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=eid("interrupt"))
                train = gr.Button("Train", variant="primary", elem_id=eid("train"), interactive=not unavailable)
        with gr.Column():
            result = gr.HTML(elem_id=eid("result"))
            gr.HTML(elem_id=eid("progress"))  # filled from the progress API by dreamartist.js
            gallery = gr.Gallery(label="Previews", columns=4, object_fit="contain", elem_id=eid("gallery"))
            loss = gr.HTML(elem_id=eid("loss"))
    names = list(controls)
    resume.change(fn=resume_handler(names, mode.saved_options), inputs=[resume], outputs=list(controls.values()))
    started = ui_compat.click(
        train, fn=call_queue.wrap_gradio_gpu_call(train_handler(names, mode), extra_outputs=[gr.update()] * 2),
        js=mode.js, inputs=[ui_compat.task_id_input(eid("task_id")), *inputs, *controls.values()],
        outputs=[gallery, loss, result])  # the last output takes the webui's timing HTML
    # Afterwards, not as an output of the run: an output shows gradio's "processing" overlay the whole time.
    started.then(fn=lambda: gr.update(choices=mode.saved()), inputs=[], outputs=[resume])
    interrupt.click(fn=jobs.interrupt, inputs=[], outputs=[])


def create_tab() -> gr.Blocks:
    """Build the tab's Blocks (call inside on_ui_tabs)."""
    unavailable = host.host_unsupported_reason()
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Tabs(elem_id=elem_id("modes")):
            with gr.TabItem("Pair (DreamArtist)", id="pair", elem_id=elem_id("pair_tab")):
                _side(PAIR, unavailable)
            with gr.TabItem("Identity (Beyond Inserting)", id="identity", elem_id=elem_id("identity_tab")):
                _side(IDENTITY, unavailable)
    return tab


def on_ui_tabs() -> list[tuple[gr.Blocks, str, str]]:
    return [(create_tab(), TAB_TITLE, TAB_ID)]
