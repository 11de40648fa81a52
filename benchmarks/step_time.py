"""Time and memory of a DreamArtist step against its floors, measured side by side in one run; prints ratios.

    python benchmarks/step_time.py [--full-size sd1 | --ckpt MODEL] [--size 256] [--batch 1] [--steps 5]

Each row's time is the median of --steps steps, taken in rounds that step every row once in turn (so a machine
whose speed drifts slows every row alike), after the memory measurement's two steps. A step of --batch images
takes twice as many rows through the UNet, [S^n; S^p] or [uncond; cond]. Rows:
- floor: a bare UNet forward+backward on the same rows (gradient to a fixed context only);
- textual inversion: the positive-only step (half the rows);
- DreamArtist: one UNet call on [S^n; S^p] rows (eq. 3), then the same with PN adapters;
- reconstruction floor: the VAE decoder's forward+backward alone at that size; DreamArtist + reconstruction (eq. 6);
- identity mode: Beyond Inserting's step (its block, two text encodes, one UNet row with the K/V split and the
  attention loss, the augmented face encoded), against DreamArtist with and without reconstruction;
- sampling: one CFG step (the same rows, no gradient) with phi^p / phi^n as per-row hooks, against the same step
  with a LoRA merged into the weights, which is what the webui's built-in Lora costs. Both are a generation's later
  steps: each round installs the hooks or merges the LoRA and takes one untimed step first, as the first step of a
  generation places and stacks the adapters it keeps for the rest.
Memory: the CUDA peak where a GPU is used; on a CPU its counterpart (process RSS says nothing about one step): the
bytes alive before the row's first step (the model's weights, the trainable tensors) plus the highest the CPU
allocator's count rose above that over two steps, as torch's profiler records it (so the optimiser's moments,
created by the first step, count in the second).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist import losses  # noqa: E402
from dreamartist.attention_control import controlled  # noqa: E402
from dreamartist.backend import Conditioning  # noqa: E402
from dreamartist.config import TrainConfig  # noqa: E402
from dreamartist.images import load_image, prepare_reference  # noqa: E402
from dreamartist.objective import POS  # noqa: E402
from dreamartist.trainer import Trainer  # noqa: E402

LIMITS = {"identity mode / DreamArtist (+ rec, the default)": 1.30,
          "DreamArtist / floor": 1.10, "DA + adapters / DA": 1.30, "DA + rec / (DA + rec floor)": 1.10,
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


def cpu_peak_above_start(block) -> int:
    """The highest the CPU allocator's count rose above its value at the start while ``block()`` ran."""
    with tempfile.TemporaryDirectory() as folder:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            block()
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max([0] + [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"])


@dataclass
class Row:
    step: Callable[[], None]
    resident: int = 0  # bytes alive before its first step beyond the model's weights (the trainable tensors)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    settle: bool = False  # an untimed step in the context first: a generation's first step builds what it keeps
    seconds: list[float] = field(default_factory=list)
    memory: int = 0


def peak_memory(row: Row, device: torch.device, weights: int) -> int:
    """The CUDA peak of the row's second step on a GPU; on a CPU the weights and ``row.resident`` plus the CPU
    allocator's peak above them over two steps. Either way the first step warms up (allocator, lazy init)."""
    with row.context():
        if device.type != "cuda":
            return weights + row.resident + cpu_peak_above_start(lambda: (row.step(), row.step()))
        row.step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        row.step()
        return torch.cuda.max_memory_allocated(device)


def time_in_rounds(rows: dict[str, Row], device: torch.device, rounds: int) -> None:
    for _ in range(rounds):
        for row in rows.values():
            with row.context():
                if row.settle:
                    row.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                row.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row.seconds.append(time.perf_counter() - start)


def ready_trainer(backend, size: int, out: Path, reference, **options) -> Trainer:
    config = TrainConfig(name="walle", width=size, height=size, steps=1, **options)
    trainer = Trainer(backend, config, [reference], out)
    trainer._start()
    with torch.no_grad():
        trainer.latents = [backend.vae_encode(reference.pixels.unsqueeze(0).to(backend.device))]
    return trainer


def ready_identity(backend, size: int, out: Path, reference, batch: int):
    from dreamartist.config import IdentityConfig
    from dreamartist.identity_training import IdentityTrainer

    config = IdentityConfig(name="walle", width=size, height=size, steps=1, batch_size=batch)
    trainer = IdentityTrainer(backend, config, [reference], out)
    trainer._start()
    return trainer


def textual_inversion_step(trainer: Trainer):
    """Positive-only textual inversion: L = ||eps - eps(z_t, S^p)||^2 on one row, one UNet call."""
    backend = trainer.backend
    optimizer = torch.optim.AdamW(list(trainer.params[POS].values()), lr=trainer.config.lr)

    def step():
        b = trainer.config.batch_size
        z0 = torch.cat([trainer.latents[0]] * b)
        t = torch.randint(0, backend.alphas_cumprod.shape[0], (b,))
        noise = torch.randn_like(z0)
        abar = backend.alphas_cumprod[t].to(backend.device).view(-1, 1, 1, 1)
        cond = backend.encode(["a photo of walle"] * b, {"walle": trainer.params[POS]}, ("pos",) * b)
        out = backend.unet(losses.add_noise(z0, noise, abar), t.to(backend.device), cond)
        losses.da_loss(out, losses.target(backend.prediction_type, z0, noise, abar)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def unet_floor_step(trainer: Trainer):
    """A bare UNet forward+backward on the step's rows, gradient to a fixed context only."""
    backend = trainer.backend
    with torch.no_grad():
        b = trainer.config.batch_size
        cond = backend.encode(["a photo of walle-neg"] * b + ["a photo of walle"] * b,
                              trainer.objective.words(trainer.params))
    context = cond.context.detach().requires_grad_(True)

    def step():
        z = torch.cat([trainer.latents[0]] * 2 * b)
        backend.unet(z, torch.full((2 * b,), 500, device=backend.device),
                     Conditioning(context)).square().mean().backward()
        context.grad = None
    return step


def decoder_floor_step(trainer: Trainer):
    """The VAE decoder's forward+backward alone on the step's latents: the part eq. 6 adds."""
    latent = torch.cat([trainer.latents[0]] * trainer.config.batch_size).detach().requires_grad_(True)

    def step():
        trainer.backend.vae_decode(latent).abs().mean().backward()
        latent.grad = None
    return step


def sampling_step(trainer: Trainer):
    """One CFG sampling step: the [negative; prompt] rows in one UNet call, no gradient (a row's context installs
    the adapters or merges the LoRA, once per generation as in the webui)."""
    backend = trainer.backend
    with torch.no_grad():
        b = trainer.config.batch_size
        cond = backend.encode(["walle-neg"] * b + ["walle"] * b, trainer.objective.words(trainer.params),
                              ("neg",) * b + ("pos",) * b)

    def step():
        with torch.no_grad():
            backend.unet(torch.cat([trainer.latents[0]] * 2 * b), torch.full((2 * b,), 500, device=backend.device),
                         cond)
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
    parser.add_argument("--batch", type=int, default=1,
                        help="images per step (default: 1): 2 x batch rows, the prompts' and the negatives'")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row, one per round (default: 5)")
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
    print(f"model {backend.model_name} ({backend.family}), {device}, {args.size}x{args.size}, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} rounds")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for module in backend.modules for t in [*module.parameters(), *module.buffers()]}
    weights = sum(storages.values())

    def trainable_bytes(trainer: Trainer) -> int:
        return sum(t.nbytes for group in trainer.params.values() for t in group.values())

    with tempfile.TemporaryDirectory() as out, backend.training():
        plain, with_adapters, rec = (
            ready_trainer(backend, args.size, Path(out), reference, batch_size=args.batch, **options)
            for options in ({"reconstruction": False}, {"reconstruction": False, "adapters": True},
                            {"reconstruction": True}))
        identity = ready_identity(backend, args.size, Path(out) / "identity", reference, args.batch)
        pos_lora = unflatten(with_adapters.params[f"{UNET}_pos"])
        # generation's adapters: frozen tensors from the files, which the hooks move to the model's device and dtype
        # on a generation's first step
        frozen = {group: {k: v.detach().to(backend.dtype) for k, v in values.items()}
                  for group, values in with_adapters.params.items()}
        patches = with_adapters.objective.patches(frozen)
        rows = {
            "floor: UNet fwd+bwd, same rows": Row(unet_floor_step(plain)),
            "textual inversion (S^p rows only)": Row(textual_inversion_step(plain), trainable_bytes(plain)),
            "DreamArtist": Row(plain._optimizer_step, trainable_bytes(plain)),
            "DreamArtist + adapters": Row(with_adapters._optimizer_step, trainable_bytes(with_adapters)),
            "reconstruction floor: decoder fwd+bwd": Row(decoder_floor_step(plain)),
            "DreamArtist + reconstruction": Row(rec._optimizer_step, trainable_bytes(rec)),
            "identity mode": Row(identity._optimizer_step, trainable_bytes(identity),
                                 lambda: controlled(backend, identity.objective.control)),
            "sampling step, adapter hooks": Row(sampling_step(with_adapters), trainable_bytes(with_adapters),
                                                lambda: backend.patched(patches), settle=True),
            "sampling step, LoRA merged": Row(sampling_step(with_adapters), trainable_bytes(with_adapters),
                                              lambda: merged(backend.adapter_layers()[UNET], pos_lora), settle=True),
        }
        for row in rows.values():
            row.memory = peak_memory(row, device, weights)
        time_in_rounds(rows, device, args.steps)
    unit = "CUDA peak" if device.type == "cuda" else "CPU peak"
    seconds = {label: statistics.median(row.seconds) for label, row in rows.items()}
    for label, row in rows.items():
        spread = f"({min(row.seconds) * 1000:.0f}-{max(row.seconds) * 1000:.0f})"
        print(f"{label:42s} {seconds[label] * 1000:10.1f} ms/step {spread:>15s} {row.memory / 2**20:10.1f} MiB {unit}")
    ratios = {
        "identity mode / DreamArtist (+ rec, the default)": seconds["identity mode"]
        / seconds["DreamArtist + reconstruction"],
        "identity mode / DreamArtist (no rec)": seconds["identity mode"] / seconds["DreamArtist"],
        "DreamArtist / floor": seconds["DreamArtist"] / seconds["floor: UNet fwd+bwd, same rows"],
        "DA + adapters / DA": seconds["DreamArtist + adapters"] / seconds["DreamArtist"],
        "DA + rec / (DA + rec floor)": seconds["DreamArtist + reconstruction"]
        / (seconds["DreamArtist"] + seconds["reconstruction floor: decoder fwd+bwd"]),
        "sampling, adapter hooks / merged LoRA": seconds["sampling step, adapter hooks"]
        / seconds["sampling step, LoRA merged"],
        "memory, DA + adapters / DA": rows["DreamArtist + adapters"].memory / rows["DreamArtist"].memory,
    }
    for label, ratio in ratios.items():
        if label not in LIMITS:
            print(f"{label:42s} {ratio:6.3f}")
            continue
        verdict = "ok" if ratio <= LIMITS[label] else "ABOVE"
        print(f"{label:42s} {ratio:6.3f}   (target <= {LIMITS[label]:.2f}: {verdict})")


if __name__ == "__main__":
    main()
