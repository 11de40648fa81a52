"""modules.processing: txt2img processing objects and process_images in the webui's order."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from modules import devices, extra_networks, prompt_parser, sd_samplers, shared
from modules._variant import FLAGS
from modules.generation_parameters_copypaste import quote
from PIL import Image

_EMPTY_CACHE = 3 if FLAGS.forge else 2


class StableDiffusionProcessing:
    """The fields a script sees on ``p``; the stand-in defaults to a 64x64, 3-step generation."""

    cached_uc = [None] * _EMPTY_CACHE
    cached_c = [None] * _EMPTY_CACHE

    def __init__(self, sd_model=None, prompt="", negative_prompt="", styles=None, seed=-1, subseed=-1,
                 sampler_name="DDIM", batch_size=1, n_iter=1, steps=3, cfg_scale=7.0, width=64, height=64,
                 do_not_save_samples=False, do_not_save_grid=False, extra_generation_params=None,
                 do_not_reload_embeddings=False, override_settings=None, disable_extra_networks=False, **kwargs):
        self.prompt, self.negative_prompt, self.styles = prompt, negative_prompt, styles or []
        self.seed, self.subseed, self.sampler_name = seed, subseed, sampler_name
        self.batch_size, self.n_iter, self.steps, self.cfg_scale = batch_size, n_iter, steps, cfg_scale
        self.width, self.height = width, height
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.extra_generation_params = dict(extra_generation_params or {})
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.override_settings = dict(override_settings or {})
        self.disable_extra_networks = disable_extra_networks
        self.scripts = None
        self._script_args = None
        self.all_prompts = self.all_negative_prompts = self.all_seeds = self.all_subseeds = None
        self.main_prompt = self.main_negative_prompt = None
        self.prompts = self.negative_prompts = self.seeds = self.subseeds = None
        self.extra_network_data: dict = {}
        self.comments: dict = {}
        self.iteration = 0
        self.c = self.uc = None
        for key, value in kwargs.items():
            setattr(self, key, value)

    @property
    def sd_model(self):
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass  # like the webui, p always works on shared.sd_model

    @property
    def script_args(self):
        return self._script_args

    @script_args.setter
    def script_args(self, value):
        self._script_args = value
        if self.scripts is not None:
            self.scripts.setup_scrips(self, is_ui=False)

    def comment(self, text: str) -> None:
        self.comments[text] = 1

    def init(self, all_prompts, all_seeds, all_subseeds) -> None:
        pass

    def save_samples(self) -> bool:
        """As the webui's; only for objects that have a folder to save into (the UI and the API set one)."""
        return bool(getattr(self, "outpath_samples", None)) and shared.opts.samples_save and \
            not self.do_not_save_samples and not shared.state.interrupted

    def setup_prompts(self) -> None:
        count = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else count * [self.prompt]
        negative = self.negative_prompt
        self.all_negative_prompts = list(negative) if isinstance(negative, list) else count * [negative]
        self.main_prompt, self.main_negative_prompt = self.all_prompts[0], self.all_negative_prompts[0]

    def parse_extra_network_prompts(self) -> None:
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def get_conds_with_caching(self, function, required_prompts, steps, caches):
        """Reuse a cached cond when the key (prompts, steps, clip skip, checkpoint, networks) matches."""
        key = (tuple(required_prompts), steps, shared.opts.CLIP_stop_at_last_layers,
               getattr(shared.sd_model, "sd_checkpoint_info", None), self.extra_network_data)
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        cache = caches[0]
        with devices.autocast():
            cache[1] = function(shared.sd_model, required_prompts, steps)
        cache[0] = key
        return cache[1]

    def setup_conds(self) -> None:
        negatives = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height,
                                                 is_negative_prompt=True)
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negatives, self.steps,
                                              [self.cached_uc])
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts, self.steps,
                                             [self.cached_c])

    def close(self) -> None:
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None] * _EMPTY_CACHE
            StableDiffusionProcessing.cached_uc = [None] * _EMPTY_CACHE

    if FLAGS.forge:
        def clear_prompt_cache(self) -> None:
            StableDiffusionProcessing.cached_c = [None] * _EMPTY_CACHE
            StableDiffusionProcessing.cached_uc = [None] * _EMPTY_CACHE
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None] * _EMPTY_CACHE
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None] * _EMPTY_CACHE


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None] * _EMPTY_CACHE
    cached_hr_c = [None] * _EMPTY_CACHE

    def __init__(self, enable_hr=False, hr_prompt="", hr_negative_prompt="", hr_scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr, self.hr_scale = enable_hr, hr_scale
        self.hr_prompt, self.hr_negative_prompt = hr_prompt, hr_negative_prompt
        self.all_hr_prompts = self.all_hr_negative_prompts = None
        self.hr_prompts = self.hr_negative_prompts = None
        self.hr_c = self.hr_uc = None

    def setup_prompts(self) -> None:
        super().setup_prompts()
        if not self.enable_hr:
            return
        self.hr_prompt = self.hr_prompt or self.prompt
        self.hr_negative_prompt = self.hr_negative_prompt or self.negative_prompt
        count = self.batch_size * self.n_iter
        hr, hr_neg = self.hr_prompt, self.hr_negative_prompt
        self.all_hr_prompts = list(hr) if isinstance(hr, list) else count * [hr]
        self.all_hr_negative_prompts = list(hr_neg) if isinstance(hr_neg, list) else count * [hr_neg]

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds=None, subseed_strength=0.0,
               prompts=None):
        noise = _noise(self, seeds)
        if FLAGS.before_every_sampling and self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=noise, noise=noise, c=conditioning,
                                                       uc=unconditional_conditioning)
        if not hasattr(self.sd_model, "apply_model") and sd_samplers.forge_unet(self.sd_model) is None:
            return noise  # a weightless Forge-shaped stand-in engine has no UNet to sample with
        samples = sd_samplers.sample_ddim(self, noise, conditioning, unconditional_conditioning)
        if self.enable_hr:  # the stand-in's second pass samples again at the same size, with the hires conds
            if self.scripts is not None:
                self.scripts.before_hr(self)
            negatives = prompt_parser.SdConditioning(self.hr_negative_prompts, is_negative_prompt=True)
            self.hr_uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negatives, self.steps,
                                                     [self.cached_hr_uc])
            self.hr_c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning,
                                                    prompt_parser.SdConditioning(self.hr_prompts), self.steps,
                                                    [self.cached_hr_c])
            samples = sd_samplers.sample_ddim(self, noise, self.hr_c, self.hr_uc)
        return samples


def _noise(p, seeds) -> torch.Tensor:
    return torch.stack([torch.randn(4, p.height // 8, p.width // 8, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img: ``init`` resizes the init images (images.resize_image with the resize mode) and encodes them as the
    webui does (the first stage's posterior *sampled*, get_first_stage_encoding); ``sample`` noises that latent to
    the denoising strength and runs the remaining DDIM steps."""

    def __init__(self, init_images=None, resize_mode=0, denoising_strength=0.75, mask=None, **kwargs):
        super().__init__(**kwargs)
        self.init_images, self.resize_mode, self.denoising_strength = init_images, resize_mode, denoising_strength
        self.image_mask = mask
        self.init_latent = None
        self.outpath_samples = str(shared.cmd_opts.data_dir) + "/outputs/img2img-images"
        self.color_corrections = None

    def init(self, all_prompts, all_seeds, all_subseeds) -> None:
        from modules import images

        pixels = []
        for image in self.init_images:
            image = image.convert("RGB")
            if self.resize_mode != 3:
                image = images.resize_image(self.resize_mode, image, self.width, self.height)
            pixels.append(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))
        batch = torch.from_numpy(np.stack(pixels * self.batch_size if len(pixels) == 1 else pixels)) * 2 - 1
        self.init_latent = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(batch))

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds=None, subseed_strength=0.0,
               prompts=None):
        steps = max(1, int(min(self.denoising_strength, 0.999) * self.steps))
        t = sd_samplers.ddim_timesteps(self.steps)[steps - 1]
        abar = self.sd_model.alphas_cumprod.float()[t]
        x = abar.sqrt() * self.init_latent + (1 - abar).sqrt() * _noise(self, seeds)
        original, self.steps = self.steps, steps
        try:
            return sd_samplers.sample_ddim(self, x, conditioning, unconditional_conditioning)
        finally:
            self.steps = original


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", infotexts=None):
        self.images, self.seed, self.info = images_list, seed, info
        self.infotexts = infotexts or [info]
        self.prompt, self.negative_prompt = p.prompt, p.negative_prompt
        self.all_prompts, self.all_negative_prompts = p.all_prompts, p.all_negative_prompts
        self.all_seeds, self.extra_generation_params = p.all_seeds, p.extra_generation_params
        self.width, self.height, self.batch_size = p.width, p.height, p.batch_size
        if FLAGS.empty_run_infotext:
            self.infotexts = infotexts or [info] * len(images_list)
        self.comments = "".join(f"{comment}\n" for comment in p.comments)


def get_fixed_seed(seed) -> int:
    return int(random.randrange(4294967294)) if seed is None or seed == "" or seed == -1 else int(seed)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None) -> str:
    """Prompt, "Negative prompt: ..." and one line of "Key: value" pairs including extra_generation_params;
    with use_main_prompt (the grid's infotext) the first image's, from p.main_prompt / p.main_negative_prompt."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    all_negative_prompts = p.all_negative_prompts if all_negative_prompts is None else all_negative_prompts
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": all_seeds[index],
              "Size": f"{p.width}x{p.height}", "Model hash": getattr(p.sd_model, "sd_model_hash", None),
              "Denoising strength": getattr(p, "denoising_strength", None), **p.extra_generation_params}
    if FLAGS.extra_params_callables:
        for key, value in list(params.items()):
            if callable(value):
                params[key] = value(p=p, index=index, iteration=iteration, position_in_batch=position_in_batch)
            elif isinstance(value, list):
                params[key] = value[index] if index < len(value) else None
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    prompt = p.main_prompt if use_main_prompt else all_prompts[index]
    negative = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]
    return f"{prompt}" + (f"\nNegative prompt: {negative}" if negative else "") + f"\n{text}"


def process_images(p) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored = {k: getattr(shared.opts, k) for k in p.override_settings}
    try:
        for key, value in p.override_settings.items():
            setattr(shared.opts, key, value)
        return process_images_inner(p)
    finally:
        for key, value in stored.items():
            setattr(shared.opts, key, value)


def _decode(sd_model, samples: torch.Tensor) -> list:
    if getattr(sd_model, "first_stage_model", None) is None and sd_samplers.forge_unet(sd_model) is None:
        return [Image.new("RGB", (samples.shape[-1] * 8, samples.shape[-2] * 8)) for _ in samples]
    pixels = ((sd_model.decode_first_stage(samples).float() + 1) / 2).clamp(0, 1)
    arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def process_images_inner(p) -> Processed:
    if FLAGS.forge:
        from modules import sd_models

        sd_models.forge_model_reload()
    seed = get_fixed_seed(p.seed)
    if FLAGS.hijack_modules:  # Forge Neo has no modules.sd_hijack
        from modules.sd_hijack import model_hijack

        model_hijack.clear_comments()
    p.setup_prompts()
    p.all_seeds = [seed + i for i in range(len(p.all_prompts))]
    p.all_subseeds = list(p.all_seeds)
    if not FLAGS.forge and not p.do_not_reload_embeddings:
        model_hijack.embedding_db.load_textual_inversion_embeddings()
    if p.scripts is not None:
        p.scripts.process(p)
    infotexts, output_images = [], []
    if shared.state.job_count == -1:
        shared.state.job_count = p.n_iter
    grad_mode = torch.inference_mode() if FLAGS.forge or FLAGS.webui_model_on_forge_backend else torch.no_grad()
    with grad_mode, getattr(p.sd_model, "ema_scope", contextlib.nullcontext)():
        p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
        for n in range(p.n_iter):
            p.iteration = n
            if shared.state.interrupted or (FLAGS.stopping_generation and shared.state.stopping_generation):
                break
            batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
            p.seeds, p.subseeds = p.all_seeds[batch], p.all_subseeds[batch]
            if getattr(p, "all_hr_prompts", None) is not None:
                p.hr_prompts, p.hr_negative_prompts = p.all_hr_prompts[batch], p.all_hr_negative_prompts[batch]
            batch_kwargs = dict(batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            if p.scripts is not None:
                p.scripts.before_process_batch(p, **batch_kwargs)
            if FLAGS.webui_model_on_forge_backend:
                p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            if not p.disable_extra_networks:
                p.parse_extra_network_prompts()
                extra_networks.activate(p, p.extra_network_data)
            if FLAGS.webui_model_on_forge_backend:  # reForge: the parts load (LoRA patched in) in inference mode
                from ldm_patched.modules import model_management

                objects = p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
                model_management.load_models_gpu([objects.unet, objects.clip.patcher, objects.vae.patcher])
            if p.scripts is not None:
                p.scripts.after_extra_networks_activate(p, **batch_kwargs, extra_network_data=p.extra_network_data)
                p.scripts.process_batch(p, **batch_kwargs)
            p.setup_conds()
            if not FLAGS.forge:  # Forge's hijack stub keeps no generation params
                p.extra_generation_params.update(model_hijack.extra_generation_params)
            if not (FLAGS.forge or FLAGS.alphas_follow_half):
                from modules import sd_models

                sd_models.apply_alpha_schedule_override(p.sd_model, p)
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds,
                               subseed_strength=0.0, prompts=p.prompts)
            images = _decode(p.sd_model, samples)
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, images, batch_number=n)
            for i, image in enumerate(images):
                text = create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, None, n, i)
                if p.save_samples():
                    from modules import images as saving

                    saving.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], "png", info=text, p=p)
                infotexts.append(text)
                image.info["parameters"] = text
                output_images.append(image)
            extra_networks.deactivate(p, p.extra_network_data)
            shared.state.nextjob()
    if not infotexts and FLAGS.empty_run_infotext:
        infotexts.append(create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds))
    res = Processed(p, output_images, p.all_seeds[0], infotexts[0], infotexts=infotexts)  # 1.6: IndexError if none
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
