"""DreamArtist's entries in the webui's Settings tab."""
from __future__ import annotations

from modules import shared

SECTION = ("dreamartist", "DreamArtist")
SETTING_KEY = "dreamartist_auto_negative"


def on_ui_settings() -> None:
    shared.opts.add_option(SETTING_KEY, shared.OptionInfo(
        True, "Add DreamArtist negative partners to the negative prompt", section=SECTION,
    ).info("the default of the DreamArtist checkbox under txt2img and img2img: "
           "NAME in the prompt brings NAME-neg into the negative prompt"))


def auto_negative_default() -> bool:
    """Whether a NAME in the prompt brings NAME-neg along unless the user unticks it (read at any time)."""
    return bool(getattr(shared.opts, SETTING_KEY, True))
