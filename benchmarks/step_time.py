"""Seconds per step and peak memory: a DreamArtist step against its baselines (prints figures; not a test).

    python benchmarks/step_time.py [--ckpt MODEL | --full-size sd1] [--size 512] [--steps 10]

Rows: a DreamArtist step (one UNet call on [S^n; S^p] rows, eq. 3), the same with the reconstruction loss
(eq. 6, decoder backward), a positive-only textual-inversion step on the same model and image, and the
floor: a bare UNet forward+backward on the same two-row batch with a fixed context.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist import losses  # noqa: E402
from dreamartist.config import TrainConfig  # noqa: E402
from dreamartist.images import load_image, prepare_reference  # noqa: E402
from dreamartist.objective import NEG, POS  # noqa: E402
from dreamartist.trainer import Trainer  # noqa: E402


def full_size_backend(family: str):
    """The real SD 1.x / 2.x architecture (shipped configs) with random weights: realistic cost, no download."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamartist.standalone import StandaloneBackend, clip_tokenizer
    from dreamartist.standalone.backend import scaled_linear_alphas_cumprod
    from dreamartist.standalone.checkpoint import CONFIG_ROOT, read_config

    folder = CONFIG_ROOT / family
    return StandaloneBackend(
        family=family, unet=UNet2DConditionModel.from_config(read_config(folder, "unet")),
        vae=AutoencoderKL.from_config(read_config(folder, "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(read_config(folder, "text_encoder"))),
        tokenizer=clip_tokenizer(), alphas_cumprod=scaled_linear_alphas_cumprod(), model_name=f"{family} (random)")


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:8.0f} MiB (CUDA peak)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB (process peak RSS)"


def timed(step, device: torch.device, steps: int) -> float:
    step()  # warm-up: allocator, autotuning, lazy init
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def textual_inversion_step(trainer: Trainer):
    """Positive-only textual inversion: L = ||eps - eps(z_t, S^p)||^2 on B rows, one UNet call."""
    backend = trainer.backend
    optimizer = torch.optim.AdamW(list(trainer.params[POS].values()), lr=trainer.config.lr)

    def step():
        z0 = trainer.latents[0]
        t = torch.randint(0, backend.alphas_cumprod.shape[0], (1,))
        noise = torch.randn_like(z0)
        abar = backend.alphas_cumprod[t].to(backend.device).view(-1, 1, 1, 1)
        z_t = losses.add_noise(z0, noise, abar)
        cond = backend.encode(["a photo of walle"], {"walle": trainer.params[POS]}, ("pos",))
        out = backend.unet(z_t, t.to(backend.device), cond)
        losses.da_loss(out, losses.target(backend.prediction_type, z0, noise, abar)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def unet_floor_step(trainer: Trainer):
    """A bare UNet forward+backward on the two-row batch, gradient to a fixed context only."""
    backend = trainer.backend
    with torch.no_grad():
        cond = backend.encode(["a photo of walle-neg", "a photo of walle"],
                              {"walle": trainer.params[POS], "walle-neg": trainer.params[NEG]})
    cond.context.requires_grad_(True)

    def step():
        z = torch.cat([trainer.latents[0]] * 2)
        t = torch.full((2,), 500, device=backend.device)
        backend.unet(z, t, cond).float().square().mean().backward()
        cond.context.grad = None
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint; default: the demo model")
    parser.add_argument("--full-size", choices=("sd1", "sd2"), help="the real architecture with random weights")
    parser.add_argument("--size", type=int, default=256, help="training size in pixels (default: 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row, after one warm-up (default: 10)")
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "examples" / "reference.png"),
                        help="reference image (default: examples/reference.png)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the UNet's blocks")
    args = parser.parse_args()

    from dreamartist.standalone import build_demo_backend, load_checkpoint

    if args.ckpt:
        backend = load_checkpoint(args.ckpt)
    else:
        backend = full_size_backend(args.full_size) if args.full_size else build_demo_backend()
    reference = prepare_reference(load_image(args.image), args.size, args.size)
    print(f"model {backend.model_name} ({backend.family}), device {backend.device}, {args.size}x{args.size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, mean of {args.steps} steps")
    rows = []
    with tempfile.TemporaryDirectory() as out, backend.training(args.gradient_checkpointing):
        for rec in (False, True):
            config = TrainConfig(name="walle", width=args.size, height=args.size, reconstruction=rec, steps=1)
            trainer = Trainer(backend, config, [reference], Path(out))
            trainer._start()
            with torch.no_grad():
                trainer.latents = [backend.vae_encode(reference.pixels.unsqueeze(0).to(backend.device))]
            label = "DreamArtist step" + (" + reconstruction" if rec else "")
            seconds = timed(trainer._optimizer_step, backend.device, args.steps)
            rows.append((label, seconds, peak_memory(backend.device)))
            if not rec:
                rows.append(("textual-inversion step (S^p only)", timed(textual_inversion_step(trainer),
                             backend.device, args.steps), peak_memory(backend.device)))
                rows.append(("UNet fwd+bwd, 2 rows (floor)", timed(unet_floor_step(trainer), backend.device,
                             args.steps), peak_memory(backend.device)))
    for label, seconds, memory in rows:
        print(f"{label:40s} {seconds * 1000:9.1f} ms/step   {memory}")


if __name__ == "__main__":
    main()
