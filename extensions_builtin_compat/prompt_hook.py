"""The automatic partner: each DreamArtist NAME a prompt uses brings NAME-neg into that image's negative prompt,
with the same weight and for the same steps (host_pairing decides both with the host's own parsers).

Runs in Script.process, the first hook after setup_prompts has filled p.all_prompts (edits before it are
overwritten) and the embeddings have been reloaded; edits there hold for every batch and the infotext.
"""
from __future__ import annotations

from . import embeddings, host_pairing, settings

INFOTEXT_KEY = "DreamArtist"  # "walle, robo": partners added; "off": the pairs were left alone
TOGGLE_FIELD = "DreamArtist auto-negative"  # set by on_infotext_pasted, read by the checkbox
OFF = "off"
PROMPT_LISTS = (("all_prompts", "all_negative_prompts"), ("all_hr_prompts", "all_hr_negative_prompts"))


def ui(script, is_img2img: bool) -> list:
    """One checkbox whose value becomes the ``enabled`` argument of ``process``."""
    import gradio as gr

    checkbox = gr.Checkbox(value=settings.auto_negative_default(), label="DreamArtist: add NAME-neg to the "
                           "negative prompt for each NAME in the prompt", elem_id=script.elem_id("auto_negative"))
    script.infotext_fields = [(checkbox, TOGGLE_FIELD)]
    return [checkbox]


def process(p, enabled: bool = True, *_args) -> None:
    """Edit p.all_negative_prompts (and the hires ones) per image; record the names in the infotext."""
    partners = {name.lower(): partner for name, partner in embeddings.partners().items()}
    encoder = host_pairing.prompt_encoder(getattr(p, "sd_model", None))
    if not partners or encoder is None:
        return
    used, added = [], []
    for prompts_name, negatives_name in PROMPT_LISTS:
        prompts, negatives = getattr(p, prompts_name, None), getattr(p, negatives_name, None)
        if not prompts or negatives is None:
            continue
        edited = list(negatives)
        for i, prompt in enumerate(prompts[:len(edited)]):
            negative, names = host_pairing.pair_negative(encoder, prompt, edited[i], partners)
            used += host_pairing.partner_text(encoder, prompt, partners, set())[1]
            if enabled:
                edited[i] = negative
                added += names
        if enabled:
            setattr(p, negatives_name, edited)  # a new list: the hires list may be the same object
            if negatives_name == "all_negative_prompts" and edited:
                p.main_negative_prompt = edited[0]  # setup_prompts copied it already; the grid's infotext reads it
    if enabled and added:
        p.extra_generation_params[INFOTEXT_KEY] = ", ".join(dict.fromkeys(added))
    elif not enabled and used:
        p.extra_generation_params[INFOTEXT_KEY] = OFF


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """Restore the checkbox from a pasted infotext: ticked when partners were added, unticked for "off"."""
    if INFOTEXT_KEY in params:
        params[TOGGLE_FIELD] = params[INFOTEXT_KEY] != OFF
