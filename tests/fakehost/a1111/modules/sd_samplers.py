"""A DDIM sampler with CFG, run the way the webui's CFGDenoiser runs it (cond rows first, callbacks per step)."""
from __future__ import annotations

import math

import torch
from modules import prompt_parser, script_callbacks, shared


class CFGDenoiser:
    """What on_cfg_denoiser sees as ``params.denoiser`` (1.8+)."""

    def __init__(self, p, total_steps: int):
        self.p, self.step, self.total_steps = p, 0, total_steps
        self.sampler, self.mask, self.init_latent = None, None, None


def ddim_timesteps(steps: int, total: int = 1000) -> list[int]:
    """ldm's "uniform" discretisation: every (total // steps)-th timestep, shifted by one."""
    return [t + 1 for t in range(0, total, total // steps)][:steps]


def catenate_conds(conds: list):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript_cond(cond, a: int, b: int):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: value[a:b] for key, value in cond.items()}


def cfg_denoise(p, denoiser, x: torch.Tensor, t: int, cond, uncond) -> torch.Tensor:
    """One step of the webui's CFGDenoiser: the cond rows (image-major, one per AND sub-prompt) then one uncond
    row per image; on_cfg_denoiser; uncond skipped early (1.10's skip_early_cond) or on odd steps below
    s_min_uncond; one UNet call, or calls of batch-size rows (batch_cond_uncond off), or, when cond and uncond
    differ in length, the cond rows in chunks and then the uncond rows; the combine. Returns the guided output."""
    opts = shared.opts
    conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, denoiser.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, denoiser.step)
    batch_size = len(conds_list)
    repeats = [len(conds) for conds in conds_list]
    x_in = torch.cat([torch.stack([x[i]] * n) for i, n in enumerate(repeats)] + [x])
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.long)
    params = script_callbacks.CFGDenoiserParams(x_in, torch.zeros(x_in.shape[0], 5, 1, 1), t_in, denoiser.step,
                                                denoiser.total_steps, tensor, uncond, denoiser)
    script_callbacks.cfg_denoiser_callback(params)
    x_in, t_in, tensor, uncond = params.x, params.sigma, params.text_cond, params.text_uncond
    early = getattr(opts, "skip_early_cond", 0.0)
    skip = bool(early and denoiser.step / denoiser.total_steps <= early) or bool(
        denoiser.step % 2 and opts.s_min_uncond > 0 and t < opts.s_min_uncond)
    if skip:
        x_in, t_in = x_in[:-batch_size], t_in[:-batch_size]

    def unet(a, b, context):  # make_condition_dict: SDXL's dict conds go in as they are
        cond = context if isinstance(context, dict) else {"c_crossattn": [context]}
        return p.sd_model.apply_model(x_in[a:b], t_in[a:b], cond=cond)

    if tensor.shape[1] == uncond.shape[1] or skip:
        cond_in = tensor if skip else catenate_conds([tensor, uncond])
        if opts.batch_cond_uncond:
            x_out = unet(0, x_in.shape[0], cond_in)
        else:
            x_out = torch.cat([unet(a, a + batch_size, subscript_cond(cond_in, a, a + batch_size))
                               for a in range(0, x_in.shape[0], batch_size)])
    else:
        chunk = 2 * batch_size if opts.batch_cond_uncond else batch_size
        x_out = torch.cat([unet(a, min(a + chunk, tensor.shape[0]), subscript_cond(tensor, a, a + chunk))
                           for a in range(0, tensor.shape[0], chunk)]
                          + [unet(tensor.shape[0], x_in.shape[0], uncond)])
    if skip:
        x_out = torch.cat([x_out, torch.cat([x_out[conds[0][0]:conds[0][0] + 1] for conds in conds_list])])
    scale = 1.0 if skip else p.cfg_scale
    uncond_out = x_out[-batch_size:]
    return torch.stack([uncond_out[i] + sum((x_out[row] - uncond_out[i]) * (weight * scale) for row, weight in conds)
                        for i, conds in enumerate(conds_list)])


def _can_concat(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The Forge family's ConditionCrossAttn.can_concat: contexts of other lengths go into one call (each repeated up
    to their lengths' least common multiple) unless that repeats one more than 4 times."""
    if a.shape == b.shape:
        return True
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= 4


def forge_unet(sd_model):
    """The UNet a Forge-family model samples with (its UNet patcher's model), None on A1111's model objects and on
    Forge's weightless stand-in engines."""
    objects = getattr(sd_model, "forge_objects", None)
    return getattr(getattr(objects, "unet", None), "model", None)


def forge_cfg_denoise(p, denoiser, x: torch.Tensor, t: int, cond, uncond) -> torch.Tensor:
    """One step of the Forge family's sampling_function: one cond entry per AND position (the images' compositions
    zipped, each a chunk of one row per image) and one uncond chunk; calc_cond_uncond_batch puts every chunk whose
    context can be concatenated with the first one's into one UNet call (a shorter context repeated up to the longest
    one's length), in reverse order, and names each call's chunks in its
    transformer_options (cond_or_uncond: 0 cond, 1 uncond); the cond chunks averaged, then CFG."""
    conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, denoiser.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, denoiser.step)
    as_dict = lambda c: c if isinstance(c, dict) else {"crossattn": c}  # noqa: E731  (SDXL: with its "vector")
    tensor, uncond = as_dict(tensor), as_dict(uncond)
    parts = min(len(conds) for conds in conds_list)
    to_run = [({key: value[[conds[k][0] for conds in conds_list]] for key, value in tensor.items()}, 0)
              for k in range(parts)] + [(uncond, 1)]
    model = forge_unet(p.sd_model)
    outputs: dict[int, list] = {0: [], 1: []}
    while to_run:
        first = to_run[0][0]["crossattn"]
        batch = [i for i, (c, _) in enumerate(to_run) if _can_concat(first, c["crossattn"])][::-1]
        chunks = [to_run[i] for i in batch]
        to_run = [chunk for i, chunk in enumerate(to_run) if i not in batch]
        x_in = torch.cat([x] * len(chunks))
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long)
        options = {"cond_or_uncond": [branch for _, branch in chunks]}
        length = math.lcm(*(c["crossattn"].shape[1] for c, _ in chunks))
        joined = {key: torch.cat([c[key].repeat(1, length // c[key].shape[1], 1) if key == "crossattn" else c[key]
                                  for c, _ in chunks]) for key in chunks[0][0]}
        y = {"y": joined["vector"]} if "vector" in joined else {}
        out = model.diffusion_model(x_in, t_in, context=joined["crossattn"], transformer_options=options,
                                    **y).chunk(len(chunks))
        for (_, branch), o in zip(chunks, out, strict=True):
            outputs[branch].append(o)
    cond_out, uncond_out = torch.stack(outputs[0]).mean(0), outputs[1][0]
    return uncond_out + (cond_out - uncond_out) * p.cfg_scale


def sample_ddim(p, x: torch.Tensor, c, uc) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from noise ``x`` through ``cfg_denoise`` (the Forge family's on its models)."""
    sd_model = p.sd_model
    forge = forge_unet(sd_model)
    predictor = getattr(forge, "predictor", None)  # Neo's KModel holds the schedule; reForge's webui model does
    alphas = (predictor.alphas_cumprod if predictor is not None else sd_model.alphas_cumprod).float()
    v_prediction = (predictor.prediction_type == "v_prediction" if predictor is not None
                    else sd_model.parameterization == "v")
    denoise = cfg_denoise if forge is None else forge_cfg_denoise
    timesteps = ddim_timesteps(p.steps)
    denoiser = CFGDenoiser(p, len(timesteps))
    shared.state.sampling_steps = len(timesteps)
    for i, index in enumerate(reversed(range(len(timesteps)))):
        shared.state.sampling_step = denoiser.step = i
        if shared.state.interrupted:
            break
        t = timesteps[index]
        a_t = alphas[t]
        a_prev = alphas[timesteps[index - 1]] if index > 0 else alphas[0]
        out = denoise(p, denoiser, x, t, c, uc)
        if v_prediction:
            out = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        after = script_callbacks.AfterCFGCallbackParams(out, i, len(timesteps))
        script_callbacks.cfg_after_cfg_callback(after)
        eps = after.x
        pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
    return x
