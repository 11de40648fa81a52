"""A DDIM sampler with CFG, run the way the webui's CFGDenoiser runs it (cond rows first, callbacks per step)."""
from __future__ import annotations

import torch
from modules import script_callbacks, shared


class CFGDenoiser:
    """What on_cfg_denoiser sees as ``params.denoiser`` (1.8+)."""

    def __init__(self, p, total_steps: int):
        self.p, self.step, self.total_steps = p, 0, total_steps
        self.sampler, self.mask, self.init_latent = None, None, None


def ddim_timesteps(steps: int, total: int = 1000) -> list[int]:
    """ldm's "uniform" discretisation: every (total // steps)-th timestep, shifted by one."""
    return [t + 1 for t in range(0, total, total // steps)][:steps]


def _model_eps(sd_model, x_in, t_in, c, uc):
    rows = x_in.shape[0] - uc.shape[0]
    if c.shape[1] == uc.shape[1]:
        return sd_model.apply_model(x_in, t_in, cond={"c_crossattn": [torch.cat([c, uc])]})
    cond_out = sd_model.apply_model(x_in[:rows], t_in[:rows], cond={"c_crossattn": [c]})
    uncond_out = sd_model.apply_model(x_in[rows:], t_in[rows:], cond={"c_crossattn": [uc]})
    return torch.cat([cond_out, uncond_out])


def sample_ddim(p, x: torch.Tensor, c: torch.Tensor, uc: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from noise ``x``; eps = uncond + cfg_scale * (cond - uncond)."""
    sd_model = p.sd_model
    alphas = sd_model.alphas_cumprod.float()
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
        batch = x.shape[0]
        x_in, t_in = torch.cat([x, x]), torch.full((2 * batch,), t, dtype=torch.long)
        image_cond = torch.zeros(2 * batch, 5, 1, 1)
        params = script_callbacks.CFGDenoiserParams(x_in, image_cond, t_in, i, len(timesteps), c, uc, denoiser)
        script_callbacks.cfg_denoiser_callback(params)
        out = _model_eps(sd_model, params.x, params.sigma, params.text_cond, params.text_uncond)
        script_callbacks.cfg_denoised_callback(script_callbacks.CFGDenoisedParams(out, i, len(timesteps), sd_model))
        if sd_model.parameterization == "v":
            out = a_t.sqrt() * out + (1 - a_t).sqrt() * params.x
        eps = out[batch:] + p.cfg_scale * (out[:batch] - out[batch:])
        after = script_callbacks.AfterCFGCallbackParams(eps, i, len(timesteps))
        script_callbacks.cfg_after_cfg_callback(after)
        eps = after.x
        pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
    return x
