"""Peak memory of DreamArtist training on SDXL at 1024 px, against a 12 GiB budget; prints figures (not a test).

    python benchmarks/sdxl_memory.py [--size 1024] [--dtype fp16|bf16] [--ckpt MODEL] [--steps 2]

Each setting (gradient checkpointing on/off x reconstruction loss on/off) is one training run of the full-size SDXL
base (the shipped configs with random weights, or --ckpt): UNet and text encoders in fp16/bf16, the VAE in float32,
the reference's latents encoded once and cached, one copy of every weight, nothing but S^p and S^n trainable.

- With a CUDA GPU: ``torch.cuda.max_memory_allocated`` over a few optimiser steps, labelled "measured".
- Without one: the same micro-batch on the meta device (shapes only: no memory, no arithmetic), labelled
  "estimate" = the weights' bytes (parameter counts x bytes per value) + what autograd keeps for backward (every
  saved tensor's bytes but the frozen weights themselves; attention as the fused CUDA kernels keep it) + the
  largest transient. With gradient checkpointing, the activations inside each block that diffusers checkpoints
  (UNet: each ResnetBlock2D and BasicTransformerBlock; VAE decoder: its mid block and each up block) are replaced
  by that block's inputs, and the transient is the largest block's activations while it is recomputed in
  backward; without it, the transient is the largest single saved tensor (its gradient). Allocator rounding and
  kernel workspaces are not counted.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist.config import TrainConfig  # noqa: E402
from dreamartist.images import load_image, prepare_reference  # noqa: E402
from dreamartist.objective import DreamArtistObjective  # noqa: E402

BUDGET = 12 * 2**30
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def full_size_sdxl(device: str, dtype: torch.dtype, ckpt: str | None):
    """The SDXL base architecture from the shipped configs, random weights (or a checkpoint), on ``device``."""
    from dreamartist.standalone import load_checkpoint
    from dreamartist.standalone.backend import scaled_linear_alphas_cumprod
    from dreamartist.standalone.checkpoint import CONFIG_ROOT, empty_models, read_config
    from dreamartist.standalone.sdxl import SDXLBackend
    from dreamartist.standalone.tokenizer import clip_tokenizer

    if ckpt:
        return load_checkpoint(ckpt, device=device, dtype=dtype)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = CONFIG_ROOT / "sdxl"
    if device == "meta":
        unet, vae, clip_l = empty_models(folder)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        with torch.device(device):
            unet = UNet2DConditionModel.from_config(read_config(folder, "unet")).to(dtype)
            vae = AutoencoderKL.from_config(read_config(folder, "vae"))
            clip_l = CLIPTextModel(CLIPTextConfig.from_dict(read_config(folder, "text_encoder"))).to(dtype)
    with torch.device(device):
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(read_config(folder, "text_encoder_2")))
    return SDXLBackend(unet=unet, vae=vae, text_encoder=clip_l, text_encoder_2=clip_g.to(dtype),
                       tokenizer=clip_tokenizer(), alphas_cumprod=scaled_linear_alphas_cumprod(),
                       model_name="SDXL base (random)", device=device, dtype=dtype)


def weight_bytes(backend) -> int:
    return sum(t.numel() * t.element_size() for m in backend.modules for t in [*m.parameters(), *m.buffers()])


class FlashLikeAttention(torch.autograd.Function):
    """Scaled dot-product attention as the fused CUDA kernels keep it for backward (flash / memory-efficient: q, k,
    v, the output and a float32 log-sum-exp per query), not the (queries x keys) matrix the meta device's math
    fallback would save. Shapes only: it runs on the meta device."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if attn_mask is not None or is_causal:  # the text encoders' causal masks: small, counted as they are
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return FlashLikeAttention.apply(query, key, value)


_SDPA = torch.nn.functional.scaled_dot_product_attention


class KeptForBackward:
    """Bytes autograd keeps for backward, inside and outside the blocks diffusers checkpoints."""

    def __init__(self, backend):
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        decoder = backend.vae_model.decoder
        self.units = [m for m in backend.unet_model.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
        self.units += [decoder.mid_block, *decoder.up_blocks]
        self.weights = {id(t) for m in backend.modules for t in [*m.parameters(), *m.buffers()]}  # counted already
        self.inside: dict[int, int] = {}
        self.inputs: dict[int, int] = {}
        self.outside, self.largest = 0, 0
        self.active: list[int] = []
        self.handles = []
        for unit in self.units:
            self.handles.append(unit.register_forward_pre_hook(self._enter))
            self.handles.append(unit.register_forward_hook(self._leave))

    def _enter(self, module, args):
        if not self.active:
            self.inputs[id(module)] = self.inputs.get(id(module), 0) + sum(
                a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        self.active.append(id(module))

    def _leave(self, module, args, output):
        self.active.pop()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) in self.weights or id(tensor._base) in self.weights:  # a frozen weight, kept for grad of x
            return tensor
        size = tensor.numel() * tensor.element_size()
        self.largest = max(self.largest, size)
        if self.active:
            self.inside[self.active[0]] = self.inside.get(self.active[0], 0) + size
        else:
            self.outside += size
        return tensor

    def estimate(self, checkpointing: bool) -> tuple[int, int]:
        """(kept for backward, transient) in bytes."""
        if not checkpointing:
            return self.outside + sum(self.inside.values()), self.largest
        return self.outside + sum(self.inputs.values()), max(self.inside.values(), default=0)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def meta_step(backend, config: TrainConfig, reference) -> KeptForBackward:
    """One micro-batch of the objective (S^n and S^p rows in one UNet call, eq. 6 decode) on the meta device."""
    objective = DreamArtistObjective(backend, config)
    params = {group: {key: torch.zeros(n, width, device="meta", requires_grad=True)
                      for key, width in backend.embedding_dims.items()}
              for group, n in (("pos_words", config.pos_len), ("neg_words", config.neg_len))}
    h, w = (side // backend.vae_scale for side in reference.pixels.shape[-2:])
    latents = torch.zeros(1, backend.latent_channels, h, w, device="meta")
    counter = KeptForBackward(backend)
    torch.nn.functional.scaled_dot_product_attention = fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), backend.training():
            objective.loss(params, [reference], latents, torch.Generator().manual_seed(0)).backward()
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA
        counter.close()
    return counter


def cuda_run(backend, config: TrainConfig, reference, steps: int) -> int:
    from dreamartist.trainer import Trainer

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        Trainer(backend, config.replace(steps=steps), [reference], Path(out)).run()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="training size in pixels (default: 1024)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="UNet and text encoders (default: fp16)")
    parser.add_argument("--ckpt", help="an SDXL checkpoint (default: the shipped configs with random weights)")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per setting on a GPU (default: 2)")
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "examples" / "reference.png"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    backend = full_size_sdxl("cuda" if cuda else "meta", DTYPES[args.dtype], args.ckpt)
    reference = prepare_reference(load_image(args.image), args.size, args.size)
    weights = weight_bytes(backend)
    kind = f"measured (CUDA peak on {torch.cuda.get_device_name()})" if cuda else "estimate (meta device)"
    print(f"SDXL base, {args.size}x{args.size}, {args.dtype} UNet and text encoders, float32 VAE: {kind}")
    print(f"weights {weights / 2**30:.2f} GiB ({sum(p.numel() for m in backend.modules for p in m.parameters()):,}"
          " parameters, one copy)")
    for reconstruction in (False, True):
        config = TrainConfig(name="walle", width=args.size, height=args.size, reconstruction=reconstruction)
        counter = None if cuda else meta_step(backend, config, reference)
        for checkpointing in (True, False):
            label = (f"gradient checkpointing {'on ' if checkpointing else 'off'}, reconstruction "
                     f"{'on ' if reconstruction else 'off'}")
            if cuda:
                try:
                    peak, detail = cuda_run(backend, config.replace(gradient_checkpointing=checkpointing), reference,
                                            args.steps), ""
                except torch.cuda.OutOfMemoryError:
                    print(f"{label}: out of memory")
                    continue
            else:
                kept, transient = counter.estimate(checkpointing)
                peak = weights + kept + transient
                detail = f"  (kept for backward {kept / 2**30:.2f} GiB, transient {transient / 2**30:.2f} GiB)"
            verdict = "fits" if peak <= BUDGET else "ABOVE"
            print(f"{label}: {peak / 2**30:6.2f} GiB, {verdict} 12 GiB{detail}")


if __name__ == "__main__":
    main()
