"""modules.sd_models: CheckpointInfo, model_data (lazy shared.sd_model) and the load sequence of a model."""
from __future__ import annotations

import hashlib

import torch
from modules import extra_networks, script_callbacks, sd_hijack
from modules._variant import FLAGS


class CheckpointInfo:
    def __init__(self, filename: str):
        self.filename = filename
        self.name = self.name_for_extra = self.model_name = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        self.sha256 = hashlib.sha256(filename.encode()).hexdigest()
        self.hash = self.sha256[:8]
        self.shorthash = self.sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = self.title
        self.metadata = {}

    def calculate_shorthash(self) -> str:
        return self.shorthash


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models: list = []
        self.loader = None  # the test host sets how a model is built on first access

    def get_sd_model(self):
        if self.sd_model is None and self.loader is not None:
            load_model(self.loader())
        return self.sd_model

    def set_sd_model(self, v) -> None:
        self.sd_model = v
        if v is not None and v not in self.loaded_sd_models:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def get_empty_cond(sd_model):
    """Encode "" with every extra network deactivated, as the webui does after each load (SDXL: its crossattn)."""
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img()
    extra_networks.activate(p, {})
    with torch.no_grad():
        if hasattr(sd_model, "conditioner"):
            return sd_model.get_learned_conditioning([""])["crossattn"]
        return sd_model.cond_stage_model([""])


if not FLAGS.alphas_follow_half:
    def rescale_zero_terminal_snr_abar(alphas_cumprod):
        """sqrt(abar) shifted to end at 0 and scaled to keep its start; the last abar set to 4.8973451890853435e-08."""
        root = alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root -= last
        root *= first / (first - last)
        abar = root ** 2
        abar[-1] = 4.8973451890853435e-08
        return abar

    def apply_alpha_schedule_override(sd_model, p=None) -> None:
        """alphas_cumprod from the fp32 original, downcast to fp16 and/or rescaled to zero terminal SNR when the
        settings ask for it."""
        from modules import shared

        sd_model.alphas_cumprod = sd_model.alphas_cumprod_original
        if shared.opts.use_downcasted_alpha_bar:
            if p is not None:
                p.extra_generation_params["Downcast alphas_cumprod"] = True
            sd_model.alphas_cumprod = sd_model.alphas_cumprod.half()
        if shared.opts.sd_noise_schedule == "Zero Terminal SNR":
            if p is not None:
                p.extra_generation_params["Noise Schedule"] = shared.opts.sd_noise_schedule
            sd_model.alphas_cumprod = rescale_zero_terminal_snr_abar(sd_model.alphas_cumprod)


def load_model(model, half: bool = False, checkpoint: str = "models/Stable-diffusion/tiny-test.safetensors"):
    """Flags, checkpoint info, optional half precision (SDXL: extend_sdxl), hijack, embedding reload,
    on_model_loaded."""
    model.is_sdxl = hasattr(model, "conditioner")
    model.is_sd2 = not model.is_sdxl and hasattr(model.cond_stage_model, "model")
    model.is_sd1 = not model.is_sdxl and not model.is_sd2
    model.sd_checkpoint_info = CheckpointInfo(checkpoint)
    model.sd_model_checkpoint = checkpoint
    model.sd_model_hash = model.sd_checkpoint_info.calculate_shorthash()
    model.lowvram = False
    if FLAGS.before_every_sampling:  # 1.10: from the UNet's input channels
        model.is_sdxl_inpaint = model.is_sdxl and model.model.diffusion_model.unet.config.in_channels == 9
    if model.is_sdxl:
        from modules import sd_models_xl

        if half and FLAGS.alphas_follow_half:
            model.half()  # 1.6/1.7 SDXL: alphas_cumprod made in the halved UNet's dtype
        sd_models_xl.extend_sdxl(model)
    alphas = model.alphas_cumprod
    if half:
        model.half()  # 1.6/1.7: halves alphas_cumprod too (SDXL's is a plain attribute: kept)
        if not FLAGS.alphas_follow_half:
            model.alphas_cumprod = alphas
    if not FLAGS.alphas_follow_half:  # 1.8+: an fp32 original in both precisions, then the sampling override
        model.alphas_cumprod_original = alphas
        apply_alpha_schedule_override(model)
    sd_hijack.model_hijack.hijack(model)
    if FLAGS.webui_model_on_forge_backend:
        from modules_forge import forge_loader

        forge_loader.attach(model)
    model_data.set_sd_model(model)
    if not FLAGS.webui_model_on_forge_backend:  # reForge reads the folder at its first generation only
        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    model.cond_stage_model_empty_prompt = get_empty_cond(model)
    script_callbacks.model_loaded_callback(model)
    return model
