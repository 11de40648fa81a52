"""DreamArtist's entries in the webui's Settings tab: the defaults of the controls under txt2img and img2img."""
from __future__ import annotations

from modules import shared

SECTION = ("dreamartist", "DreamArtist")
SETTING_KEY = "dreamartist_auto_negative"
MODE_KEY = "dreamartist_adapters_mode"
STRENGTH_KEYS = ("dreamartist_adapter_strength_pos", "dreamartist_adapter_strength_neg")
DEFAULTS = {SETTING_KEY: True, MODE_KEY: "pair", STRENGTH_KEYS[0]: 0.8, STRENGTH_KEYS[1]: 0.65}


def on_ui_settings() -> None:
    import gradio as gr

    opts, info = shared.opts, shared.OptionInfo
    opts.add_option(SETTING_KEY, info(
        True, "Add DreamArtist negative partners to the negative prompt", section=SECTION,
    ).info("NAME in the prompt brings NAME-neg into the negative prompt"))
    opts.add_option(MODE_KEY, info(
        "pair", "PN adapters of pairs that have them", gr.Radio, {"choices": ["pair", "DA++", "off"]},
        section=SECTION).info("pair: S^n and phi^n on the negative side; DA++: phi^n alone there, no S^n"))
    for key, label, default in ((STRENGTH_KEYS[0], "Strength of phi^p (positive adapter)", 0.8),
                                (STRENGTH_KEYS[1], "Strength of phi^n (negative adapter)", 0.65)):
        opts.add_option(key, info(default, label, gr.Slider, {"minimum": 0.0, "maximum": 2.0, "step": 0.05},
                                  section=SECTION))


def default(key: str):
    """A setting's value now: saved, or its default (also before the Settings tab has registered it)."""
    return getattr(shared.opts, key, DEFAULTS[key])


def auto_negative_default() -> bool:
    """Whether a NAME in the prompt brings NAME-neg along unless the user unticks it."""
    return bool(default(SETTING_KEY))
