"""Feature flags of each stand-in host variant, per webui version."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flags:
    variant: str
    version: str  # what modules.launch_utils / git would report
    forge: bool = False
    callback_name_kw: bool = False  # on_*(cb, *, name=None), 1.9+
    infotext_utils: bool = False  # modules.infotext_utils, 1.8+ (old name kept as alias)
    before_every_sampling: bool = False  # Script.process_before_every_sampling, 1.10+
    cfg_params_denoiser: bool = False  # CFGDenoiserParams.denoiser, 1.8+
    alphas_follow_half: bool = False  # model.half() halves alphas_cumprod, 1.6/1.7
    embeddings_cast_to_input: bool = False  # EmbeddingsWithFixes casts to the input dtype, 1.10+
    extra_params_callables: bool = False  # extra_generation_params values may be lists/callables, 1.9+
    stopping_generation: bool = False  # State.stopping_generation / stop_generating, 1.8+
    apply_model_always_cast: bool = False  # apply_model cast + autocast always (1.10), else only with upcast
    option_categories: bool = False  # OptionInfo(category_id=) and add_option writing the default to data, 1.7+
    train_tab: bool = True
    hijack_modules: bool = True  # modules.sd_hijack, sd_hijack_* and lowvram exist (Forge Neo dropped them)
    placeholder_model: bool = False  # model_data.sd_model is a part-less placeholder until the first load (Neo)
    models_embeddings_dir: bool = False  # embeddings in <root>/models/embeddings (Neo), not <root>/embeddings
    unet_use_checkpoint: bool = False  # the SD1/SD2 configs' use_checkpoint: True reaches ldm's blocks (1.6; 1.7+ off)
    # reForge: the webui's model object, its parts behind ldm_patched ModelPatchers (model.forge_objects) that the
    # memory manager loads (LoRA patched in) at each generation, inside torch.inference_mode; encode_first_stage
    # returns scaled latents (inference mode), get_first_stage_encoding is the identity
    webui_model_on_forge_backend: bool = False
    hijack_optimizations: bool = True  # module-level sd_hijack.apply/undo_optimizations (reForge removed them)
    inplace_residuals: bool = False  # ldm_patched's blocks add residuals in place, x += n (Forge Classic)
    # ldm_patched's VAE regularizer samples the posterior at each encode (Forge Classic; reForge's takes its mode)
    vae_samples_posterior: bool = False
    # SDXL's CLIP-G is modules_forge.forge_clip's: it hangs its pooled output on the hidden state it returns, which
    # the encoder's next layer saved for backward (reForge, Forge Classic)
    pooled_on_saved_state: bool = False
    # a run interrupted before its first image still gets an infotext, and Processed's infotexts default to one per
    # image (1.10; 1.6's process_images fails on infotexts[0] there, and Processed defaults to [info])
    empty_run_infotext: bool = False


VARIANTS = {
    "v1.6.0": Flags("v1.6.0", "v1.6.0", alphas_follow_half=True, unet_use_checkpoint=True),
    "v1.10.1": Flags("v1.10.1", "v1.10.1", callback_name_kw=True, infotext_utils=True, before_every_sampling=True,
                     cfg_params_denoiser=True, embeddings_cast_to_input=True, extra_params_callables=True,
                     stopping_generation=True, apply_model_always_cast=True, option_categories=True,
                     empty_run_infotext=True),
    "forge": Flags("forge", "f2.0.1v1.10.1-previous", forge=True, callback_name_kw=True, infotext_utils=True,
                   before_every_sampling=True, cfg_params_denoiser=True, extra_params_callables=True,
                   stopping_generation=True, option_categories=True, train_tab=False, empty_run_infotext=True),
    "reforge": Flags("reforge", "f1.0.0v2-v1.10.1RC-1.10.1", callback_name_kw=True, infotext_utils=True,
                     before_every_sampling=True, cfg_params_denoiser=True, embeddings_cast_to_input=True,
                     extra_params_callables=True, stopping_generation=True, apply_model_always_cast=True,
                     option_categories=True, webui_model_on_forge_backend=True, hijack_optimizations=False,
                     empty_run_infotext=True, pooled_on_saved_state=True),
    "forge-classic": Flags("forge-classic", "f2.0.1v1.10.1-previous-classic", callback_name_kw=True,
                           infotext_utils=True, before_every_sampling=True, cfg_params_denoiser=True,
                           embeddings_cast_to_input=True, extra_params_callables=True, stopping_generation=True,
                           apply_model_always_cast=True, option_categories=True, webui_model_on_forge_backend=True,
                           hijack_optimizations=False, models_embeddings_dir=True, train_tab=False,
                           inplace_residuals=True, vae_samples_posterior=True, empty_run_infotext=True,
                           pooled_on_saved_state=True),
    "forge-neo": Flags("forge-neo", "neo", forge=True, callback_name_kw=True, infotext_utils=True,
                       before_every_sampling=True, cfg_params_denoiser=True, extra_params_callables=True,
                       stopping_generation=True, option_categories=True, train_tab=False, hijack_modules=False,
                       placeholder_model=True, models_embeddings_dir=True, empty_run_infotext=True),
}
