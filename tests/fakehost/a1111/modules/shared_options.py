"""modules.shared_options: the built-in settings the stand-in host reads (a small subset, real defaults)."""
from __future__ import annotations

from modules._variant import FLAGS, ROOT
from modules.options import OptionInfo, options_section

restricted_opts = {"samples_filename_pattern", "directories_filename_pattern", "outdir_samples"}

options_templates: dict[str, OptionInfo] = {}
options_templates.update(options_section(("sd", "Stable Diffusion"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_checkpoints_limit": OptionInfo(1, "Maximum number of checkpoints loaded at the same time"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    "enable_emphasis": OptionInfo(True, "Enable emphasis"),
}))
if FLAGS.infotext_utils:
    options_templates.update(options_section(("sd", "Stable Diffusion"), {
        "emphasis": OptionInfo("Original", "Emphasis mode"),
    }))
if FLAGS.before_every_sampling:  # 1.10
    options_templates.update(options_section(("sd", "Stable Diffusion"), {
        "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
    }))
options_templates.update(options_section(("sdxl", "Stable Diffusion XL"), {
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score"),
    "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score"),
}))
options_templates.update(options_section(("optimizations", "Optimizations"), {
    "cross_attention_optimization": OptionInfo("Automatic", "Cross attention optimization"),
    "s_min_uncond": OptionInfo(0.0, "Negative Guidance minimum sigma"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
}))
if FLAGS.before_every_sampling:  # 1.10
    options_templates.update(options_section(("optimizations", "Optimizations"), {
        "skip_early_cond": OptionInfo(0.0, "Ignore negative prompt during early sampling"),
    }))
if not FLAGS.alphas_follow_half:
    options_templates.update(options_section(("optimizations", "Optimizations"), {
        "use_downcasted_alpha_bar": OptionInfo(False, "Downcast model alphas_cumprod to fp16 before sampling."),
    }))
    options_templates.update(options_section(("sampler-params", "Sampler parameters"), {
        "sd_noise_schedule": OptionInfo("Default", "Noise schedule for sampling"),  # or "Zero Terminal SNR"
    }))
if FLAGS.models_embeddings_dir:  # Forge Neo: a folder in the webui, created only when the setting changes
    options_templates.update(options_section(("saving-paths", "Paths for saving"), {
        "temp_dir": OptionInfo(str(ROOT / "tmp"), "Directory for temporary images"),
    }))
if FLAGS.train_tab:  # Forge Classic removed the Train tab and its settings with it
    options_templates.update(options_section(("training", "Training"), {
        "unload_models_when_training": OptionInfo(False, "Move VAE and CLIP to RAM when training if possible"),
        "save_optimizer_state": OptionInfo(False, "Saves Optimizer state as separate *.optim file"),
        "training_xattention_optimizations": OptionInfo(False, "Use cross attention optimizations while training"),
    }))
options_templates.update(options_section(("saving-images", "Saving images/grids"), {
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "samples_format": OptionInfo("png", "File format for images"),
    "enable_pnginfo": OptionInfo(True, "Save text information about generation parameters as chunks to png files"),
}))
options_templates.update(options_section(("ui", "Live previews"), {
    "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
    "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
    "live_preview_refresh_period": OptionInfo(1000, "Progressbar and preview update period"),
}))
options_templates.update(options_section(("infotext", "Infotext"), {
    "textual_inversion_add_hashes_to_infotext": OptionInfo(True, "Add Textual Inversion hashes to infotext"),
    "disabled_extensions": OptionInfo([], "Disable these extensions"),
    "disable_all_extensions": OptionInfo("none", "Disable all extensions"),
    "lora_functional": OptionInfo(False, "Lora/Networks: use old method"),
    "sd_lora": OptionInfo("None", "Add network to prompt"),
}))
