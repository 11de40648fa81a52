"""Time and memory of a DreamArtist step against its floors, measured side by side in one run; prints ratios.

    python benchmarks/step_time.py [--full-size sd1 | --ckpt MODEL] [--size 256] [--steps 3]

Rows (each the mean of --steps after one warm-up):
- floor: a bare UNet forward+backward on the same two-row batch (gradient to a fixed context only);
- textual inversion: the positive-only step (one row);
- DreamArtist: one UNet call on [S^n; S^p] rows (eq. 3), then the same with PN adapters;
- reconstruction floor: the VAE decoder's forward+backward alone at that size; DreamArtist + reconstruction (eq. 6);
- sampling: one CFG step (two rows, no gradient) with phi^p / phi^n as per-row hooks, against the same step
  with a LoRA merged into the weights, which is what the webui's built-in Lora costs.
Memory: the CUDA peak where a GPU is used; on a CPU its counterpart (process RSS says nothing about one step):
the model's weights, plus what autograd keeps for the backward pass beyond them, plus the adapters' parameters and
optimiser moments.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist import losses  # noqa: E402
from dreamartist.backend import Conditioning  # noqa: E402
from dreamartist.config import TrainConfig  # noqa: E402
from dreamartist.images import load_image, prepare_reference  # noqa: E402
from dreamartist.objective import NEG, POS  # noqa: E402
from dreamartist.trainer import Trainer  # noqa: E402

LIMITS = {"DreamArtist / floor": 1.10, "DA + adapters / DA": 1.30, "DA + rec / (DA + rec floor)": 1.10,
          "sampling, adapter hooks / merged LoRA": 1.10, "memory, DA + adapters / DA": 1.10}


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


class SavedBytes:
    """Bytes autograd keeps for backward while the block runs (each storage counted once), other than the weights
    in ``resident`` (which are in memory anyway)."""

    def __init__(self, resident: set[int]):
        self.resident = resident
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.resident:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(step, device: torch.device, steps: int, weights: dict[int, int]) -> tuple[float, int]:
    """(seconds per step, bytes: CUDA peak on a GPU, else ``weights`` (storage -> bytes) plus what autograd keeps
    for backward in one step beyond them)."""
    step()  # warm-up: allocator, autotuning, lazy init
    saved = SavedBytes(set(weights))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated(device)
    return (time.perf_counter() - start) / steps, sum(weights.values()) + saved.total


def ready_trainer(backend, size: int, out: Path, reference, **options) -> Trainer:
    config = TrainConfig(name="walle", width=size, height=size, steps=1, **options)
    trainer = Trainer(backend, config, [reference], out)
    trainer._start()
    with torch.no_grad():
        trainer.latents = [backend.vae_encode(reference.pixels.unsqueeze(0).to(backend.device))]
    return trainer


def textual_inversion_step(trainer: Trainer):
    """Positive-only textual inversion: L = ||eps - eps(z_t, S^p)||^2 on one row, one UNet call."""
    backend = trainer.backend
    optimizer = torch.optim.AdamW(list(trainer.params[POS].values()), lr=trainer.config.lr)

    def step():
        z0 = trainer.latents[0]
        t = torch.randint(0, backend.alphas_cumprod.shape[0], (1,))
        noise = torch.randn_like(z0)
        abar = backend.alphas_cumprod[t].to(backend.device).view(-1, 1, 1, 1)
        cond = backend.encode(["a photo of walle"], {"walle": trainer.params[POS]}, ("pos",))
        out = backend.unet(losses.add_noise(z0, noise, abar), t.to(backend.device), cond)
        losses.da_loss(out, losses.target(backend.prediction_type, z0, noise, abar)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def unet_floor_step(trainer: Trainer):
    """A bare UNet forward+backward on the two-row batch, gradient to a fixed context only."""
    backend = trainer.backend
    with torch.no_grad():
        cond = backend.encode(["a photo of walle-neg", "a photo of walle"], trainer.objective.words(trainer.params))
    context = cond.context.detach().requires_grad_(True)

    def step():
        z = torch.cat([trainer.latents[0]] * 2)
        backend.unet(z, torch.full((2,), 500, device=backend.device), Conditioning(context)).square().mean().backward()
        context.grad = None
    return step


def decoder_floor_step(trainer: Trainer):
    """The VAE decoder's forward+backward alone on one latent: the part eq. 6 adds."""
    latent = trainer.latents[0].detach().clone().requires_grad_(True)

    def step():
        trainer.backend.vae_decode(latent).abs().mean().backward()
        latent.grad = None
    return step


def sampling_step(trainer: Trainer, patches):
    """One CFG sampling step: the [negative; prompt] rows in one UNet call, no gradient."""
    backend = trainer.backend
    with torch.no_grad():
        cond = backend.encode(["walle-neg", "walle"], trainer.objective.words(trainer.params), ("neg", "pos"))

    def step():
        with torch.no_grad(), backend.patched(patches):
            backend.unet(torch.cat([trainer.latents[0]] * 2), torch.full((2,), 500, device=backend.device), cond)
    return step


@contextlib.contextmanager
def merged(layers, lora):
    """The LoRA merged into the weights for the block, as the webui's built-in Lora does by default."""
    saved = {name: layer.weight.detach().clone() for name, layer in layers.items() if name in lora}
    with torch.no_grad():
        for name, weight in saved.items():
            delta = lora[name].up @ lora[name].down * (lora[name].alpha / lora[name].rank)
            layers[name].weight.add_(delta.to(weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="an SD 1.x / 2.x checkpoint (default: the tiny random model)")
    parser.add_argument("--full-size", choices=("sd1", "sd2"), help="the real architecture with random weights")
    parser.add_argument("--size", type=int, default=256, help="training size in pixels (default: 256)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up (default: 3)")
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "examples" / "reference.png"),
                        help="reference image (default: examples/reference.png)")
    args = parser.parse_args()

    from dreamartist.adapters import UNET, unflatten
    from dreamartist.standalone import build_random_backend, load_checkpoint

    if args.ckpt:
        backend = load_checkpoint(args.ckpt)
    else:
        backend = full_size_backend(args.full_size) if args.full_size else build_random_backend()
    reference = prepare_reference(load_image(args.image), args.size, args.size)
    device = backend.device
    print(f"model {backend.model_name} ({backend.family}), {device}, {args.size}x{args.size}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, mean of {args.steps} steps after a warm-up")
    rows: dict[str, tuple[float, int]] = {}
    weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for module in backend.modules for t in [*module.parameters(), *module.buffers()]}

    def timed(step):
        return measure(step, device, args.steps, weights)

    with tempfile.TemporaryDirectory() as out, backend.training():
        plain = ready_trainer(backend, args.size, Path(out), reference, reconstruction=False)
        rows["floor: UNet fwd+bwd, 2 rows"] = timed(unet_floor_step(plain))
        rows["textual inversion (S^p only, 1 row)"] = timed(textual_inversion_step(plain))
        rows["DreamArtist"] = timed(plain._optimizer_step)
        with_adapters = ready_trainer(backend, args.size, Path(out), reference, reconstruction=False, adapters=True)
        rows["DreamArtist + adapters"] = timed(with_adapters._optimizer_step)
        # the adapters' gradients and two Adam moments, float32 (their values are among what autograd keeps)
        adapter_bytes = 4 * 3 * sum(t.numel() for g, group in with_adapters.params.items() if g not in (POS, NEG)
                                    for t in group.values())
        rows["reconstruction floor: decoder fwd+bwd"] = timed(decoder_floor_step(plain))
        rec = ready_trainer(backend, args.size, Path(out), reference, reconstruction=True)
        rows["DreamArtist + reconstruction"] = timed(rec._optimizer_step)
        patches = with_adapters.objective.patches(with_adapters.params)
        rows["sampling step, adapter hooks"] = timed(sampling_step(with_adapters, patches))
        pos_lora = unflatten(with_adapters.params[f"{UNET}_pos"])
        with merged(backend.adapter_layers()[UNET], pos_lora):
            rows["sampling step, LoRA merged"] = timed(sampling_step(with_adapters, {}))
    unit = "CUDA peak" if device.type == "cuda" else "weights + kept for backward"
    for label, (seconds, memory) in rows.items():
        print(f"{label:42s} {seconds * 1000:10.1f} ms/step {memory / 2**20:10.1f} MiB {unit}")
    da, adapters_row = rows["DreamArtist"], rows["DreamArtist + adapters"]
    memory_with = adapters_row[1] + (0 if device.type == "cuda" else adapter_bytes)
    ratios = {
        "DreamArtist / floor": da[0] / rows["floor: UNet fwd+bwd, 2 rows"][0],
        "DA + adapters / DA": adapters_row[0] / da[0],
        "DA + rec / (DA + rec floor)": rows["DreamArtist + reconstruction"][0]
        / (da[0] + rows["reconstruction floor: decoder fwd+bwd"][0]),
        "sampling, adapter hooks / merged LoRA": rows["sampling step, adapter hooks"][0]
        / rows["sampling step, LoRA merged"][0],
        "memory, DA + adapters / DA": memory_with / da[1],
    }
    for label, ratio in ratios.items():
        verdict = "ok" if ratio <= LIMITS[label] else "ABOVE"
        print(f"{label:42s} {ratio:6.3f}   (target <= {LIMITS[label]:.2f}: {verdict})")


if __name__ == "__main__":
    main()
