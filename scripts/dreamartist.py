"""DreamArtist for the webui: registers the tab, the settings, the API routes and the prompt hook.

Only registration lives here; the webui runs this file by path with the extension root on sys.path, and
everything it uses comes from the extension's own packages, imported now while that path is set.
"""
from __future__ import annotations

from modules import script_callbacks, scripts

from extensions_builtin_compat import (
    adapter_hook,
    api,
    embeddings,
    identities,
    identity_hook,
    prompt_hook,
    settings,
    ui_tab,
)
from extensions_builtin_compat.callbacks import name_kw

embeddings.recover()  # scripts load before the model, so before the webui first reads the embeddings folder
identities.recover()

script_callbacks.on_ui_tabs(ui_tab.on_ui_tabs, **name_kw(script_callbacks.on_ui_tabs, "tab"))
script_callbacks.on_ui_settings(settings.on_ui_settings, **name_kw(script_callbacks.on_ui_settings, "settings"))
script_callbacks.on_app_started(api.on_app_started, **name_kw(script_callbacks.on_app_started, "api"))
script_callbacks.on_infotext_pasted(prompt_hook.on_infotext_pasted,
                                    **name_kw(script_callbacks.on_infotext_pasted, "infotext"))
script_callbacks.on_cfg_denoiser(adapter_hook.on_cfg_denoiser, **name_kw(script_callbacks.on_cfg_denoiser, "adapters"))
script_callbacks.on_script_unloaded(adapter_hook.end, **name_kw(script_callbacks.on_script_unloaded, "adapters"))
script_callbacks.on_script_unloaded(identity_hook.end, **name_kw(script_callbacks.on_script_unloaded, "identities"))


class DreamArtistScript(scripts.Script):
    """Adds each DreamArtist word's negative partner to the negative prompt and applies the pairs' PN adapters
    (see prompt_hook)."""

    def title(self):
        return "DreamArtist"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return prompt_hook.ui(self, is_img2img)

    def process(self, p, *args):
        prompt_hook.process(p, *args)

    def process_batch(self, p, *args, **kwargs):
        prompt_hook.process_batch(p, *args, **kwargs)

    def before_hr(self, p, *args):
        prompt_hook.before_hr(p, *args)

    def postprocess(self, p, processed, *args):
        prompt_hook.postprocess(p, processed, *args)
