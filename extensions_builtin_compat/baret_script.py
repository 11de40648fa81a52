"""The img2img script "BARET edit": the img2img image edited toward the prompt (dreamartist.baret), inside the
webui's own img2img run.

``run`` checks everything first (one sentence, nothing done), then lets the webui's ``process_images`` run with
``p.sample`` replaced, as the webui's own img2img alternative test does: the webui sets up the prompts (styles,
extra networks, and DreamArtist's prompt hook, which adds NAME-neg for each pair NAME in the prompt, exactly as in
txt2img), encodes, decodes, saves and writes the infotext; the replaced ``sample`` runs BARET on the loaded model
and returns the edited latents. The prompt is the target text, the negative prompt the unconditional text of every
branch; the img2img Sampling steps and CFG Scale are BARET's DDIM steps and guidance. The image is resized as
img2img resizes it, and encoded deterministically (the posterior mean, not the sample img2img draws), so that a
re-edit of the same image finds its inversion in the module's InversionCache.

The same runs in AUTOMATIC1111 and the Forge family (reForge and Forge Classic on the webui's model object over
ldm_patched's UNet, Forge Neo on its backend's): the attention control takes every UNet's attention modules alike,
and the Forge family's inference mode and loading are undone for the edit only.

The model is as before afterwards: the attention control is removed on exit (host_attention), target-text
inversion runs with the UNet's weights frozen for its duration and ldm's own checkpointing off (``_EditBackend``);
nothing else is changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
from collections.abc import Iterator

import numpy as np
import torch
from modules import scripts

from dreamartist import edit_config
from dreamartist.backend import frozen
from dreamartist.baret import InversionCache, decode, edit
from dreamartist.edit_config import EditConfig
from dreamartist.errors import InputError, ModelError
from dreamartist.inversion import EditProgress, EditStopped

from . import host

TITLE = "BARET edit"
FROM_IMG2IMG = ("target", "negative", "steps", "cfg")  # the prompt, the negative prompt, Sampling steps, CFG Scale
KNOBS = tuple(f for f in edit_config.fields() if f.name not in FROM_IMG2IMG)
BRANCHES_LABEL = "Show the reconstruction and transition images"
ROWS = (("alpha_start", "alpha_end", "rigid"), ("tau_sa", "sa_start", "sa_layers"), ("tau_ca", "ca_start", "ca_layers"),
        ("inversion_prompt", "ttis_iterations", "ttis_lr"), ("threshold_start", "threshold_step"))
FRACTIONS = ("alpha_start", "alpha_end", "tau_sa", "sa_start", "tau_ca", "ca_start")  # sliders over [0, 1]
SLIDER_MAX_STOPS = 256
# infotext key of each control ("BARET ..."), in the order of the script's arguments
INFOTEXT_KEYS = {
    "alpha_start": "BARET alpha start", "alpha_end": "BARET alpha end", "rigid": "BARET rigid",
    "tau_sa": "BARET tau_SA", "sa_start": "BARET SA start", "tau_ca": "BARET tau_CA", "ca_start": "BARET CA start",
    "sa_layers": "BARET SA layers", "ca_layers": "BARET CA layers", "inversion_prompt": "BARET inversion prompt",
    "ttis_iterations": "BARET TTIS iterations", "ttis_lr": "BARET TTIS lr",
    "threshold_start": "BARET threshold start", "threshold_step": "BARET threshold step",
    "branches": "BARET branches",
}
PHASES = {"inversion": "DDIM inversion", "ttis": "target-text inversion", "editing": "editing"}
STOPPED = "The BARET edit was stopped before it finished; nothing was written."
NOTE = ("<p>BARET edits the img2img image toward the <b>prompt</b> (the target text: what the edited image should "
        "show); the <b>negative prompt</b> is the unconditional text of every branch (the paper's is empty). "
        "<b>Sampling steps</b> and <b>CFG Scale</b> are BARET's DDIM steps and guidance (the paper's: 50 and 7.5); "
        "the sampler and the denoising strength are not used (the image is inverted the whole way with DDIM). "
        "Width and Height, multiples of 8, are the size it is edited at. Editing the same image and prompt again "
        "with other alpha or tau values reuses the inversion.</p>")

CACHE = InversionCache()  # inversions (with their TTIS) of the latest edits, for re-edits with other alpha/tau


# -- the controls -----------------------------------------------------------------------------------------------
def _control(script, field: dataclasses.Field):
    import gradio as gr

    meta = field.metadata
    common = dict(label=meta["label"], value=field.default, elem_id=script.elem_id(field.name),
                  info=meta["help"] or None)
    if field.type == "bool":
        return gr.Checkbox(**common)
    if meta["choices"]:
        return gr.Dropdown(choices=list(meta["choices"]), **common)
    low, high, step = meta["minimum"], meta["maximum"], meta["step"]
    if field.name in FRACTIONS:
        return gr.Slider(minimum=low, maximum=high, step=0.01, **common)
    if field.type == "int" and (high - low) / step <= SLIDER_MAX_STOPS:
        return gr.Slider(minimum=low, maximum=high, step=step, **common)
    return gr.Number(precision=0 if field.type == "int" else None, **common)


def ui(script) -> list:
    """One control per EditConfig option that img2img does not already have, with the paper's defaults, and the
    branches checkbox; ``infotext_fields`` so that pasting an edit's infotext restores them."""
    import gradio as gr

    controls = {}
    rows = list(ROWS) + [tuple(f.name for f in KNOBS if all(f.name not in row for row in ROWS))]
    by_name = {f.name: f for f in KNOBS}
    with gr.Group(elem_id=script.elem_id("settings")):
        gr.HTML(NOTE, elem_id=script.elem_id("note"))
        for row in filter(None, rows):
            with gr.Row():
                for name in row:
                    controls[name] = _control(script, by_name[name])
        controls["branches"] = gr.Checkbox(label=BRANCHES_LABEL, value=False, elem_id=script.elem_id("branches"))
    ordered = [controls[f.name] for f in KNOBS] + [controls["branches"]]
    script.infotext_fields = [(control, INFOTEXT_KEYS[name]) for name, control in
                              zip([*(f.name for f in KNOBS), "branches"], ordered, strict=True)]
    return ordered


# -- checks -----------------------------------------------------------------------------------------------------
def settings(args: tuple) -> tuple[dict, bool]:
    """The script's arguments as EditConfig knobs and the branches flag; the defaults for those not given (an API
    caller may pass fewer)."""
    defaults = [f.default for f in KNOBS] + [False]
    values = [*args[:len(defaults)], *defaults[len(args):]]
    return {f.name: value for f, value in zip(KNOBS, values, strict=False)}, bool(values[-1])


def _target_text(prompt: str) -> str:
    """The prompt as the target text: extra-network tags (<lora:...>) are not words."""
    from modules import extra_networks

    return extra_networks.parse_prompt(prompt)[0].strip()


def checked(p, args: tuple) -> tuple[EditConfig, bool]:
    """The edit's config and the branches flag; an InputError or ModelError of one sentence for what cannot be
    edited, before any work."""
    from modules import shared

    host.ensure_model_loaded()  # the Forge family loads the checkpoint at a generation, not at start-up
    reason = host.host_unsupported_reason() or host.model_unsupported_reason(shared.sd_model)
    if reason:
        raise ModelError(reason)
    images = [image for image in (getattr(p, "init_images", None) or []) if image is not None]
    if len(images) != 1:
        raise InputError("Put the one image to edit into img2img first.")
    if getattr(p, "image_mask", None) is not None:
        raise InputError("BARET edits the whole image; use the img2img tab without a mask.")
    if p.batch_size * p.n_iter != 1:
        raise InputError("BARET edits one image at a time; set Batch count and Batch size to 1.")
    if p.width % 8 or p.height % 8:
        raise InputError(f"The size {p.width}x{p.height} is not a multiple of 8 on both sides, which the model needs; "
                         "set Width and Height to multiples of 8.")
    knobs, branches = settings(args)
    prompt, negative = p.prompt, p.negative_prompt
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise InputError("BARET edits one image toward one prompt; give the prompt and the negative prompt as text.")
    config = EditConfig(target=_target_text(prompt), negative=negative, steps=p.steps, cfg=p.cfg_scale, **knobs)
    return config, branches


def infotext_params(config: EditConfig, branches: bool) -> dict:
    values = {f.name: getattr(config, f.name) for f in KNOBS} | {"branches": branches}
    return {"Script": TITLE} | {INFOTEXT_KEYS[name]: value for name, value in values.items()}


# -- the edit ---------------------------------------------------------------------------------------------------
class _EditBackend:
    """The host backend as BARET uses it here: ``training()`` is what target-text inversion needs and no more (the
    UNet's weights frozen, ldm's own checkpointing off, and what the Forge family's loading leaves in the way of a
    backward pass: inference-tensor weights, in-place residuals, attention kernels without a backward; all restored
    after); the backend's own training context would also unload the prompt's LoRAs and switch the attention
    optimisation. ``model_hash`` names the model together with the prompt's extra networks and the texts' encoding,
    for the inversion cache."""

    def __init__(self, backend, model_key: str):
        self._backend = backend
        self.model_hash = model_key

    def __getattr__(self, name):
        return getattr(self._backend, name)

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        from .host_backend import (
            attention_with_backward,
            ldm_checkpointing_off,
            normal_weights,
            norms_read_copies,
            unet_of,
        )

        unet = unet_of(self._backend.sd_model)
        with normal_weights(unet), frozen(unet), ldm_checkpointing_off(unet), norms_read_copies(unet), \
                attention_with_backward():
            yield


def _model_key(p, backend, config: EditConfig) -> str:
    """What an inversion depends on beyond the image and the options: the checkpoint, the extra networks active for
    the prompt (a LoRA changes the UNet) and the encoded texts (embeddings, clip skip, emphasis)."""
    info = getattr(backend.sd_model, "sd_checkpoint_info", None)
    checkpoint = backend.model_hash or f"{getattr(info, 'filename', '')}#{id(backend.sd_model)}"
    networks = sorted((name, [tuple(getattr(params, "items", ())) for params in entries])
                      for name, entries in (getattr(p, "extra_network_data", None) or {}).items())
    with torch.no_grad():
        texts = backend.encode([config.negative, config.target, ""]).context
    digest = hashlib.sha256(texts.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return f"{checkpoint} {networks!r} {digest}"


def _pixels(p) -> torch.Tensor:
    """The init image as img2img sizes it (its resize mode; latent upscale counts as a plain resize): (1, 3, H, W)
    in [-1, 1]."""
    from modules import images

    image = p.init_images[0].convert("RGB")
    if image.size != (p.width, p.height):
        mode = p.resize_mode if getattr(p, "resize_mode", 0) in (0, 1, 2) else 0
        image = images.resize_image(mode, image, p.width, p.height)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _should_stop() -> bool:
    from modules import shared

    return bool(shared.state.interrupted or getattr(shared.state, "stopping_generation", False))


def _progress(config: EditConfig, cached: bool):
    """Steps and text of the webui's progress bar: inversion, TTIS and editing (editing alone when cached)."""
    from modules import shared

    state = shared.state
    state.sampling_steps = config.steps * (1 if cached else 3)
    state.sampling_step = 0
    state.textinfo = f"BARET: {PHASES['editing' if cached else 'inversion']}"

    def report(progress: EditProgress) -> None:
        state.sampling_step = min(state.sampling_step + 1, state.sampling_steps)
        state.textinfo = f"BARET: {PHASES[progress.phase]}, step {progress.step} of {progress.steps}"

    return report


def _sampler(p, config: EditConfig, branches: bool, pixels: torch.Tensor, outcome: dict):
    """A replacement for ``p.sample``: BARET on the loaded model; returns the edited latents."""
    from modules import shared

    from .host_backend import forge_parts_loaded
    from .host_backend_sdxl import backend_for

    def sample(conditioning=None, unconditional_conditioning=None, seeds=None, subseeds=None, subseed_strength=None,
               prompts=None, **kwargs):
        # the texts as the webui has prepared them: styles applied, extra-network tags removed, and NAME-neg added
        # to the negative prompt by DreamArtist's prompt hook for each pair NAME in the prompt
        target = (prompts or p.prompts)[0].strip()
        negative = (getattr(p, "negative_prompts", None) or [config.negative])[0]
        edit_with = config.replace(target=target, negative=negative)
        if getattr(sys.modules.get("modules.sd_unet"), "current_unet", None) is not None:
            raise ModelError("BARET edit needs the webui's own UNet; set Settings > SD Unet to None for the edit.")
        # the Forge family samples inside torch.inference_mode, in which no gradient is taken (TTIS needs one); its
        # sampler would load the generation's parts (its LoRAs patched in) first
        with torch.inference_mode(False), forge_parts_loaded(shared.sd_model, inference=True, networks=True):
            backend = backend_for(shared.sd_model)
            backend = _EditBackend(backend, _model_key(p, backend, edit_with))
            latents = backend.vae_encode(pixels)
            cached = CACHE.get(InversionCache.key(backend, latents, edit_with)) is not None
            result = edit(backend, latents, edit_with, cache=CACHE, branch_images=branches,
                          on_progress=_progress(edit_with, cached),
                          should_stop=_should_stop)
        outcome.update(result=result, backend=backend, config=edit_with)
        return result.edited

    return sample


def _add_branches(p, processed, outcome: dict) -> None:
    """The reconstruction and transition images after the edit, with its infotext (saved as the edit was)."""
    from modules import images, shared

    pictures = decode(outcome["backend"], outcome["result"], branches=True)
    text = processed.infotexts[0] if processed.infotexts else processed.info
    for name in ("reconstruction", "transition"):
        image = pictures[name]
        if getattr(shared.opts, "enable_pnginfo", True):
            image.info["parameters"] = text
        saving = getattr(p, "save_samples", None)
        if callable(saving) and saving():
            images.save_image(image, p.outpath_samples, "", p.all_seeds[0], p.all_prompts[0],
                              getattr(shared.opts, "samples_format", "png"), info=text, p=p, suffix=f"-{name}")
        processed.images.append(image)
        processed.infotexts.append(text)


def run(p, *args):
    """The script's run(): the checks, then the webui's img2img with BARET as its sampler. What cannot be edited is
    answered with its one sentence and no image, as a stopped edit is (raised, the webui's API would log a traceback
    for it)."""
    from modules import processing

    try:
        config, branches = checked(p, args)
    except (InputError, ModelError) as refused:
        return _no_image(p, str(refused))
    pixels = _pixels(p)
    p.sampler_name = "DDIM"  # what runs, whatever the sampler chosen; the infotext says so
    p.extra_generation_params.update(infotext_params(config, branches))
    outcome: dict = {}
    p.sample = _sampler(p, config, branches, pixels, outcome)
    try:
        processed = processing.process_images(p)
    except EditStopped:
        return _no_image(p, STOPPED)
    except (InputError, ModelError) as refused:  # found by the sampler (SD Unet)
        return _no_image(p, str(refused))
    except IndexError:
        if not _should_stop():
            raise
        return _no_image(p, STOPPED)  # interrupted before the edit began: 1.6's process_images fails on infotexts[0]
    if ("result" not in outcome or not processed.images) and _should_stop():
        return _no_image(p, STOPPED)  # 1.10 returns an empty run when interrupted before the edit began
    if branches and "result" in outcome and processed.images:
        _add_branches(p, processed, outcome)
    return processed


def _no_image(p, sentence: str):
    """What a stopped or refused edit returns: no image, and the sentence where the UI shows the info and the API the
    infotexts."""
    from modules import processing

    return processing.Processed(p, [], p.seed, sentence, infotexts=[sentence])


class BaretEditScript(scripts.Script):
    """The img2img script "BARET edit" (scripts/baret_edit.py hands it to the webui)."""

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        return ui(self)

    def run(self, p, *args):
        return run(p, *args)
