"""DreamArtist at generation time: each NAME a prompt uses brings NAME-neg into that image's negative prompt, with
the same weight and for the same steps (host_pairing decides both with the host's own parsers), and the pair's
PN adapters act on their CFG branches (adapter_hook); identities the prompts name are applied (identity_hook).

``process`` is the first hook after setup_prompts has filled p.all_prompts (edits before it are overwritten) and
the embeddings have been reloaded; edits there hold for every batch and the infotext. The adapters stay
installed from ``process`` to ``postprocess``; a generation that fails in between leaves them inert (no rows are
labelled for them) until the next generation removes them.
"""
from __future__ import annotations

import logging

from . import adapter_hook, embeddings, host_pairing, identity_hook, jobs, settings

log = logging.getLogger("dreamartist")

INFOTEXT_KEY = "DreamArtist"  # "walle, robo": partners added; "off": the pairs were left alone
ADAPTERS_KEY = "DreamArtist adapters"  # "pair, 0.8, 0.65": mode and the strengths of phi^p, phi^n
TOGGLE_FIELD = "DreamArtist auto-negative"  # the paste fields, set by on_infotext_pasted
MODE_FIELD, POS_FIELD, NEG_FIELD = "DreamArtist adapters mode", "DreamArtist phi^p", "DreamArtist phi^n"
OFF = "off"
PROMPT_LISTS = (("all_prompts", "all_negative_prompts"), ("all_hr_prompts", "all_hr_negative_prompts"))


def ui(script, is_img2img: bool) -> list:
    """The controls whose values become the arguments of ``process``: pairing on/off, adapters mode, strengths."""
    import gradio as gr

    with gr.Row(elem_id=script.elem_id("row")):
        checkbox = gr.Checkbox(value=settings.auto_negative_default(), label="DreamArtist: add NAME-neg to the "
                               "negative prompt for each NAME in the prompt", elem_id=script.elem_id("auto_negative"))
        mode = gr.Dropdown(choices=list(adapter_hook.MODES), value=settings.default(settings.MODE_KEY),
                           label="PN adapters", elem_id=script.elem_id("adapters_mode"))
        pos, neg = (gr.Slider(minimum=0.0, maximum=2.0, step=0.05, value=settings.default(key), label=label,
                              elem_id=script.elem_id(key.rsplit("_", 1)[-1] + "_strength"))
                    for key, label in zip(settings.STRENGTH_KEYS, ("phi^p strength", "phi^n strength"), strict=True))
    script.infotext_fields = [(checkbox, TOGGLE_FIELD), (mode, MODE_FIELD), (pos, POS_FIELD), (neg, NEG_FIELD)]
    return [checkbox, mode, pos, neg]


def _args(args: tuple) -> tuple[bool, str, float, float]:
    """The script arguments with the defaults filled in (API callers may pass fewer)."""
    defaults = (True, settings.default(settings.MODE_KEY), *(settings.default(k) for k in settings.STRENGTH_KEYS))
    enabled, mode, pos, neg = (*args, *defaults[len(args):])[:4]
    return bool(enabled), mode if mode in adapter_hook.MODES else "pair", float(pos), float(neg)


def process(p, *args) -> None:
    """Edit p.all_negative_prompts (and the hires ones) per image, install the adapters; record both."""
    enabled, mode, pos, neg = _args(args)
    adapter_hook.end()  # a generation that failed may have left its (inert) hooks
    identity_hook.begin(p)
    partners = {name.lower(): partner for name, partner in embeddings.partners().items()}
    encoder = host_pairing.prompt_encoder(getattr(p, "sd_model", None))
    if encoder is not None:
        _report_skipped(p, encoder)
    if not partners or encoder is None:
        return
    plan = adapter_hook.plan_for(p, mode, (pos, neg)) if enabled else None
    if plan is not None and mode == "DA++":  # phi^n replaces S^n for the pairs that have adapters
        partners = {name: partner for name, partner in partners.items() if name not in
                    {pair.lower() for pair in plan.groups}}
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
    if enabled and (added or plan):
        p.extra_generation_params[INFOTEXT_KEY] = ", ".join(dict.fromkeys(added + sorted(plan.groups if plan else [])))
    elif not enabled and used:
        p.extra_generation_params[INFOTEXT_KEY] = OFF
    if plan is not None:
        p.extra_generation_params[ADAPTERS_KEY] = adapter_hook.describe(mode, (pos, neg))
        jobs.reset_cond_caches()  # cached conds were encoded without these adapters
        adapter_hook.begin(p, plan)


def _report_skipped(p, encoder) -> None:
    """Say so when a prompt names a pair the webui skipped as made for another model family: it then adds no
    partner either (a comment under the image, as the webui's own notes, and the console)."""
    skipped = embeddings.skipped_pairs()
    if not skipped:
        return
    prompts = list(dict.fromkeys(getattr(p, "all_prompts", None) or []))
    named = dict.fromkeys(name for prompt in prompts for name in host_pairing.names_in(encoder, prompt, list(skipped)))
    for name in named:
        width, expected = skipped[name]
        note = (f"DreamArtist: {name} was made for another model family ({width}-wide vectors, this model takes "
                f"{expected}), so the webui skipped it and no {name}-neg was added.")
        log.warning(note)
        if hasattr(p, "comment"):
            p.comment(note)


def process_batch(p, *args, batch_number: int, prompts: list[str], **kwargs) -> None:
    session = adapter_hook.current()
    if session is not None:
        session.start_batch(batch_number, p.batch_size, list(prompts))


def before_hr(p, *args) -> None:
    session = adapter_hook.current()
    if session is not None:
        session.start_batch(p.iteration, p.batch_size, list(p.hr_prompts), hires=True)


def postprocess(p, processed, *args) -> None:
    identity_hook.end()
    if adapter_hook.current() is not None:
        adapter_hook.end()
        jobs.reset_cond_caches()  # the conds cached now carry the adapters


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """Restore the controls from a pasted infotext: pairing on unless "off", the adapters' mode and strengths."""
    if INFOTEXT_KEY in params:
        params[TOGGLE_FIELD] = params[INFOTEXT_KEY] != OFF
    parsed = adapter_hook.parse(str(params.get(ADAPTERS_KEY, "")))
    if parsed is not None:
        params[MODE_FIELD], params[POS_FIELD], params[NEG_FIELD] = parsed
