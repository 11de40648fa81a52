"""ldm-shaped model classes around tiny diffusers modules: LatentDiffusion, DiffusionWrapper, UNetModel, VAE (sgm's
SDXL classes, which share UNetModel, are in ldm/sdxl.py)."""
from __future__ import annotations

import contextlib

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock as _DiffusersTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.models.resnet import ResnetBlock2D


class _PlainAttention(Attention):
    """The plain attention the webui puts back when no optimisation is chosen (hypernetwork's
    attention_CrossAttention_forward), called as ldm calls it: ``attn(x, context=None, mask=None)``."""

    def forward(self, x, context=None, mask=None, **kwargs):
        return Attention.forward(self, x, encoder_hidden_states=context, attention_mask=mask)


class CrossAttention(_PlainAttention):
    """ldm.modules.attention.CrossAttention (and sgm's): the class whose forward the webui's optimisations replace;
    to_q, to_k, to_v, to_out, heads and scale as ldm's."""


class CheckpointFunction(torch.autograd.Function):
    """ldm.modules.diffusionmodules.util.CheckpointFunction: recomputes the block in backward and differentiates
    with respect to its inputs AND every parameter it was given, so autograd raises ("One of the differentiated
    Tensors does not require grad") once those parameters are frozen."""

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with torch.enable_grad():
            outputs = ctx.run_function(*[x.view_as(x) for x in inputs])
        grads = torch.autograd.grad(outputs, inputs + ctx.input_params, output_grads, allow_unused=True)
        return (None, None) + grads


def checkpoint(func, inputs, params, flag):
    """ldm's checkpoint(): the block as is when ``flag`` is off, else through CheckpointFunction."""
    if flag:
        return CheckpointFunction.apply(func, len(inputs), *inputs, *params)
    return func(*inputs)


class BasicTransformerBlock(_DiffusersTransformerBlock):
    """ldm.modules.attention.BasicTransformerBlock: forward() runs _forward through ldm's checkpoint() when its
    ``checkpoint`` flag is set (1.6.0 loads SD1 with use_checkpoint: True); sd_hijack_checkpoint patches forward."""

    checkpoint = False

    def _forward(self, hidden_states, encoder_hidden_states=None, **kwargs):  # the same signature as forward
        """ldm's block (diffusers' with its default layer norms computes the same): attn1 with no context,
        attn2 with the text, called as ldm calls its CrossAttention (``context=``)."""
        x = hidden_states
        x = self.attn1(self.norm1(x), context=None) + x
        x = self.attn2(self.norm2(x), context=encoder_hidden_states) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
        def run(h, c):
            return self._forward(h, encoder_hidden_states=c, **kwargs)

        return checkpoint(run, (hidden_states, encoder_hidden_states), self.parameters(), self.checkpoint)


class ResBlock(ResnetBlock2D):
    """ldm.modules.diffusionmodules.openaimodel.ResBlock: its ``use_checkpoint`` flag works as above."""

    use_checkpoint = False

    def _forward(self, x, emb, *args, **kwargs):
        return ResnetBlock2D.forward(self, x, emb)

    def forward(self, x, emb, *args, **kwargs):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)


def _reclass(root: torch.nn.Module, base: type, cls: type) -> None:
    for module in root.modules():
        if type(module) is base:
            module.__class__ = cls


class UNetModel(torch.nn.Module):
    """ldm's (and sgm's) UNetModel call signature over a tiny diffusers UNet2DConditionModel (``unet``, or a fresh
    one); ``y`` (sgm's "vector") goes to a class-projection embedding added to the time embedding, as label_emb."""

    def __init__(self, context_dim: int, in_channels: int = 4, use_checkpoint: bool = False,
                 unet: UNet2DConditionModel | None = None):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.unet = unet or UNet2DConditionModel(
            sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=context_dim, attention_head_dim=4, norm_num_groups=4)
        self.unet.set_attn_processor(AttnProcessor())  # the plain attention; optimisations swap the class forward
        _reclass(self, Attention, CrossAttention)
        _reclass(self, _DiffusersTransformerBlock, BasicTransformerBlock)
        _reclass(self, ResnetBlock2D, ResBlock)
        for module in self.modules():  # as ldm hands the config's use_checkpoint to every block
            if isinstance(module, BasicTransformerBlock):
                module.checkpoint = use_checkpoint
            elif isinstance(module, ResBlock):
                module.use_checkpoint = use_checkpoint

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        return self.unet(x, timesteps, encoder_hidden_states=context, class_labels=y).sample


class DiffusionWrapper(torch.nn.Module):
    """ldm DiffusionWrapper: 'crossattn' (text-to-image) or 'hybrid' (inpainting: c_concat joins the input)."""

    def __init__(self, diffusion_model: torch.nn.Module, conditioning_key: str = "crossattn"):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        if self.conditioning_key == "hybrid":
            x = torch.cat([x] + c_concat, dim=1)
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class FirstStageModel(torch.nn.Module):
    """ldm AutoencoderKL: encode() returns the latent distribution, decode() is not decorated."""

    def __init__(self):
        super().__init__()
        self.vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, sample_size=64)

    def encode(self, x):
        return self.vae.encode(x).latent_dist

    def decode(self, z):
        return self.vae.decode(z).sample


def scaled_linear_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _freeze(module: torch.nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


class LatentDiffusion(torch.nn.Module):
    """ldm LatentDiffusion: first stage and text encoder frozen, UNet parameters left trainable."""

    def __init__(self, unet: UNetModel, cond_stage_model: torch.nn.Module, parameterization: str = "eps",
                 conditioning_key: str = "crossattn"):
        super().__init__()
        self.model = DiffusionWrapper(unet, conditioning_key)
        self.first_stage_model = FirstStageModel()
        self.cond_stage_model = cond_stage_model
        _freeze(self.first_stage_model)
        _freeze(self.cond_stage_model)
        self.parameterization = parameterization
        self.scale_factor = 0.18215
        self.num_timesteps = 1000
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_first_stage_encoding(self, encoder_posterior):
        z = encoder_posterior.sample() if hasattr(encoder_posterior, "sample") else encoder_posterior
        return self.scale_factor * z

    def get_learned_conditioning(self, c):
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield

