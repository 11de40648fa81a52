"""Pretrain the toy-world model from nothing: `python -m dreamartist.toyworld.pretrain [--run-dir DIR]`.

Stages, each seeded and resumable (a stage whose output exists is skipped; the long ones checkpoint):
text encoder (seeded random, frozen from then on), renders, VAE, attribute classifier, latents, UNet,
export (fp16 safetensors + JSON configs into dreamartist/toyworld/weights) and the base-model bar.
About 3.2 hours on two CPU cores with the defaults (the UNet's 17500 steps take 2.8 hours of them); `--device cuda`
trains the UNet on a GPU, drawing every random number on the CPU as before, so only the arithmetic moves (17 steps/s
on an H200: about 17 minutes for the UNet).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import models
from .data import RenderedSet, render_set, to_pixels
from .world import all_scenes, random_caption, training_scenes

DEFAULT_RUN_DIR = Path("toyworld-run")


@dataclass
class Settings:
    seed: int = 0
    train_images: int = 24000
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE trains on crops: it is convolutional, and crops cost a quarter of full images
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    unet_steps: int = 17500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_warmup: int = 200
    ema_decay: float = 0.999
    min_snr: float = 5.0
    # Offset noise: SD's schedule leaves ~7 % of the image in x_T, and the mean of x_T then decides the background
    # colour (the text cannot); a per-image, per-channel constant in the noise takes that cue away.
    offset_noise: float = 0.3
    classifier_images: int = 12000
    classifier_steps: int = 1200
    classifier_batch: int = 64
    checkpoint_every: int = 200
    sample_every: int = 1000


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _save_checkpoint(path: Path, state: dict) -> None:
    temporary = path.with_suffix(".partial")
    torch.save(state, temporary)
    temporary.replace(path)


def _load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


class Pretraining:
    """The stages of one pretraining run in ``run_dir``."""

    def __init__(self, run_dir: Path, settings: Settings, weights_dir: Path = models.WEIGHTS_DIR,
                 device: str = "cpu", workers: int = 1) -> None:
        self.run_dir, self.settings, self.weights_dir = run_dir, settings, weights_dir
        self.device, self.workers = torch.device(device), workers  # the UNet's device; render processes
        self.parts_dir = run_dir / "parts"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=1) + "\n")

    def log(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        tqdm.write(line)
        with (self.run_dir / "log.txt").open("a") as handle:
            handle.write(line + "\n")

    # -- text encoder ---------------------------------------------------------------------------------
    def text_encoder(self) -> None:
        """Seeded random CLIP text encoder, saved at once (fp16) so everything trains against the stored one."""
        if (self.parts_dir / "text_encoder.safetensors").is_file():
            return
        module = models.build_text_encoder(seed=self.settings.seed + 1)
        models.save_part(module, models.TEXT_ENCODER, self.parts_dir, "text_encoder")
        self.log("text encoder: seeded random weights saved")

    # -- renders ----------------------------------------------------------------------------------------
    def renders(self) -> RenderedSet:
        path = self.run_dir / "renders.npz"
        if not path.is_file():
            rendered = render_set(training_scenes(), self.settings.train_images, self.settings.seed + 2, "renders",
                                  self.workers)
            rendered.save(path)
            self.log(f"renders: {len(rendered)} images of {len(training_scenes())} training scenes")
        return RenderedSet.load(path)

    # -- VAE ------------------------------------------------------------------------------------------
    def vae(self) -> None:
        """A tiny AutoencoderKL: L1 + MSE reconstruction on crops, a small KL term; then its scaling factor."""
        s = self.settings
        if (self.parts_dir / "vae.safetensors").is_file():
            return
        images = self.renders().images
        vae = models.build_vae(seed=s.seed + 3).train()
        optimizer = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
        checkpoint_path, step = self.run_dir / "vae-checkpoint.pt", 0
        state = _load_checkpoint(checkpoint_path)
        if state:
            vae.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        bar = tqdm(total=s.vae_steps, initial=step, desc="vae", unit="step")
        while step < s.vae_steps:
            generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
            picks = torch.randint(0, len(images), (s.vae_batch,), generator=generator).numpy()
            corner = torch.randint(0, 64 - s.vae_crop + 1, (2,), generator=generator).tolist()
            crop = images[picks, corner[0]:corner[0] + s.vae_crop, corner[1]:corner[1] + s.vae_crop]
            pixels = to_pixels(np.ascontiguousarray(crop))
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, s.vae_steps, s.vae_lr, 100)
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            decoded = vae.decode(latents).sample
            recon = (decoded - pixels).abs().mean() + F.mse_loss(decoded, pixels)
            kl = posterior.kl().float().mean() / posterior.mean[0].numel()
            loss = recon + s.vae_kl * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(recon=f"{recon.item():.4f}", kl=f"{kl.item():.1f}")
            if step % s.checkpoint_every == 0 or step == s.vae_steps:
                _save_checkpoint(checkpoint_path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                                                   "step": step})
                self.log(f"vae step {step}: recon {recon.item():.4f} kl {kl.item():.2f}")
        bar.close()
        vae.eval()
        scale = self._latent_scale(vae, images)
        config = dict(models.VAE, scaling_factor=scale)
        models.save_part(vae, config, self.parts_dir, "vae")
        error = self._vae_error(models.load_part(self.parts_dir, "vae"), images)
        self.log(f"vae: scaling factor {scale:.4f}, full-image L1 error {error:.4f} (pixels in [-1, 1])")

    @torch.no_grad()
    def _latent_scale(self, vae, images: np.ndarray) -> float:
        """1 / std of the latents, as SD's 0.18215 makes its latents about unit variance."""
        count = min(2048, len(images))
        means = [vae.encode(to_pixels(images[i:i + 256])).latent_dist.mean for i in range(0, count, 256)]
        return float(1.0 / torch.cat(means).std())

    @torch.no_grad()
    def _vae_error(self, vae, images: np.ndarray) -> float:
        pixels = to_pixels(images[-256:])
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        return float((decoded - pixels).abs().mean())

    # -- latents --------------------------------------------------------------------------------------
    def latents(self) -> torch.Tensor:
        """Every render through the VAE encoder once (posterior mean times the scaling factor)."""
        path = self.run_dir / "latents.pt"
        if not path.is_file():
            images = self.renders().images
            vae = models.load_part(self.parts_dir, "vae")
            scale = vae.config.scaling_factor
            chunks = []
            with torch.no_grad():
                for i in tqdm(range(0, len(images), 256), desc="latents", unit="batch"):
                    chunks.append(vae.encode(to_pixels(images[i:i + 256])).latent_dist.mean * scale)
            latents = torch.cat(chunks)
            _save_checkpoint(path, {"latents": latents})
            self.log(f"latents: {tuple(latents.shape)}, std {latents.std():.3f}")
        return _load_checkpoint(path)["latents"]

    # -- UNet -----------------------------------------------------------------------------------------
    def backend(self, unet=None):
        """The parts so far as a StandaloneBackend (the text side encodes captions exactly as at run time)."""
        unet = unet if unet is not None else models.build_unet(seed=0)
        return models.assemble(models.load_part(self.parts_dir, "text_encoder"),
                               models.load_part(self.parts_dir, "vae"), unet, device=self.device)

    def unet(self) -> None:
        """Epsilon prediction, min-SNR weighting, offset noise, 10 % empty captions (for CFG), an EMA copy."""
        s = self.settings
        if (self.parts_dir / "unet.safetensors").is_file():
            return
        latents, labels = self.latents().to(self.device), self.renders().labels
        scenes = {scene.labels(): scene for scene in all_scenes()}
        unet = models.build_unet(seed=s.seed + 4).to(self.device).train()
        ema = models.build_unet(seed=s.seed + 4).to(self.device).eval().requires_grad_(False)
        ema.load_state_dict(unet.state_dict())
        backend = self.backend(ema)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
        checkpoint_path, step = self.run_dir / "unet-checkpoint.pt", 0
        state = _load_checkpoint(checkpoint_path)
        if state:
            unet.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        abar_all = backend.alphas_cumprod.to(self.device)
        snr_all = abar_all / (1 - abar_all)
        parameters, averages = list(unet.parameters()), list(ema.parameters())
        bar = tqdm(total=s.unet_steps, initial=step, desc="unet", unit="step")
        recent: list[torch.Tensor] = []  # the last 100 losses, read only when shown (reading one waits for a GPU)
        while step < s.unet_steps:
            # Every random number comes from CPU generators, so a GPU run draws exactly what a CPU run draws.
            generator = torch.Generator().manual_seed(s.seed * 1_000_003 + 7 + step)
            captions_rng = random.Random(s.seed * 1_000_003 + 11 + step)
            picks = torch.randint(0, len(latents), (s.unet_batch,), generator=generator)
            z0 = latents[picks.to(self.device)]
            captions = [random_caption(scenes[tuple(labels[i])], captions_rng) for i in picks.tolist()]
            t = torch.randint(0, len(abar_all), (s.unet_batch,), generator=generator).to(self.device)
            noise = torch.randn(z0.shape, generator=generator)
            noise = (noise + s.offset_noise * torch.randn((*z0.shape[:2], 1, 1), generator=generator)).to(self.device)
            abar = abar_all[t].view(-1, 1, 1, 1)
            z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
            with torch.no_grad():
                context = backend.encode(captions).context
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, s.unet_steps, s.unet_lr, s.unet_warmup)
            prediction = unet(z_t, t, encoder_hidden_states=context).sample
            weight = torch.clamp(snr_all[t], max=s.min_snr) / snr_all[t]  # min-SNR-gamma for eps targets
            loss = (weight * ((prediction - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            decay = min(s.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(averages, parameters, 1 - decay)
            step += 1
            recent = (recent + [loss.detach()])[-100:]
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{torch.stack(recent).mean():.4f}")
            if step % s.checkpoint_every == 0 or step == s.unet_steps:
                _save_checkpoint(checkpoint_path, {"model": unet.state_dict(), "ema": ema.state_dict(),
                                                   "optimizer": optimizer.state_dict(), "step": step})
                self.log(f"unet step {step}: loss {torch.stack(recent).mean():.4f}")
            if s.sample_every and step % s.sample_every == 0:
                self._sample_sheet(backend, step)
        bar.close()
        models.save_part(ema, models.UNET, self.parts_dir, "unet")
        self.log("unet: EMA weights saved")

    def _sample_sheet(self, backend, step: int) -> None:
        """A grid of held-out prompts at this step (EMA weights), to watch the run."""
        from dreamartist.sampling import grid, sample

        from .classifier import load_classifier
        from .world import caption, held_out_scenes

        images, labels = [], []
        for i, scene in enumerate(held_out_scenes()[::19][:8]):
            images += sample(backend, caption(scene), "", guidance=4.0, steps=20, width=64, height=64,
                             seed=i, batch=2)
            labels += [scene.labels()] * 2
        grid(images, columns=4).save(self.run_dir / f"samples-{step:06d}.png")
        if (self.parts_dir / "classifier.safetensors").is_file():
            correct = load_classifier(self.parts_dir).predict(images) == torch.tensor(labels)
            self.log(f"unet step {step}: held-out sheet accuracy per attribute "
                     f"{[round(float(c), 2) for c in correct.float().mean(dim=0)]}")

    # -- attribute classifier -------------------------------------------------------------------------
    def classifier_sets(self) -> tuple[RenderedSet, np.ndarray, RenderedSet, np.ndarray]:
        """Renders of every scene (held-out ones too: it is the judge) and their VAE round-trips, train and test."""
        path = self.run_dir / "classifier-renders.npz"
        if not path.is_file():
            s = self.settings
            train = render_set(all_scenes(), s.classifier_images, s.seed + 5, "classifier renders", self.workers)
            test = render_set(all_scenes(), 2000, s.seed + 6, "classifier test renders", self.workers)
            vae = models.load_part(self.parts_dir, "vae")
            temporary = path.with_suffix(".partial.npz")
            np.savez(temporary, train_images=train.images, train_labels=train.labels,
                     train_roundtrip=self._roundtrip(vae, train.images, s.seed + 7),
                     test_images=test.images, test_labels=test.labels,
                     test_roundtrip=self._roundtrip(vae, test.images, s.seed + 8))
            temporary.replace(path)
        with np.load(path) as data:
            return (RenderedSet(data["train_images"], data["train_labels"]), data["train_roundtrip"],
                    RenderedSet(data["test_images"], data["test_labels"]), data["test_roundtrip"])

    @torch.no_grad()
    def _roundtrip(self, vae, images: np.ndarray, seed: int) -> np.ndarray:
        """Images through the VAE with noise of up to 0.3 (in unit-variance latent units): generated-looking."""
        generator = torch.Generator().manual_seed(seed)
        scale, out = vae.config.scaling_factor, []
        for i in tqdm(range(0, len(images), 256), desc="round-trips", unit="batch"):
            latents = vae.encode(to_pixels(images[i:i + 256])).latent_dist.mean
            amount = torch.rand((len(latents), 1, 1, 1), generator=generator) * 0.3 / scale
            latents = latents + amount * torch.randn(latents.shape, generator=generator)
            pixels = vae.decode(latents).sample.clamp(-1, 1)
            out.append(((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    def classifier(self) -> None:
        """Cross-entropy per attribute on renders and round-trips, with a little pixel noise."""
        from .classifier import CLASSIFIER, build_classifier, load_classifier, save_classifier

        s = self.settings
        if (self.parts_dir / "classifier.safetensors").is_file():
            return
        train, train_roundtrip, test, test_roundtrip = self.classifier_sets()
        model = build_classifier(seed=s.seed + 9).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        labels = torch.from_numpy(train.labels)
        for step in tqdm(range(s.classifier_steps), desc="classifier", unit="step"):
            generator = torch.Generator().manual_seed(s.seed * 1_000_003 + 13 + step)
            picks = torch.randint(0, len(train), (s.classifier_batch,), generator=generator).numpy()
            use_roundtrip = torch.rand(s.classifier_batch, generator=generator).numpy() < 0.5
            images = np.where(use_roundtrip[:, None, None, None], train_roundtrip[picks], train.images[picks])
            pixels = to_pixels(images)
            pixels = pixels + torch.rand((len(pixels), 1, 1, 1), generator=generator) * 0.05 * torch.randn(
                pixels.shape, generator=generator)
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, s.classifier_steps, 2e-3, 100)
            logits = model(pixels)
            loss = sum(F.cross_entropy(logits[a], labels[picks, i]) for i, a in enumerate(logits))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        save_classifier(model, self.parts_dir, CLASSIFIER)
        shipped = load_classifier(self.parts_dir)  # measured as shipped: fp16 weights read back
        metrics = {"renders": accuracy(shipped, test.images, test.labels),
                   "vae_roundtrips": accuracy(shipped, test_roundtrip, test.labels)}
        (self.run_dir / "classifier-metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        self.log(f"classifier: held-out accuracy {metrics}")

    # -- export and the base-model bar ---------------------------------------------------------------
    def export(self) -> None:
        """Copy the finished parts and their configs into the package's weights folder."""
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        for part in (*models.PARTS, "classifier"):
            for suffix in (".safetensors", ".json"):
                shutil.copyfile(self.parts_dir / f"{part}{suffix}", self.weights_dir / f"{part}{suffix}")
        self.log(f"export: weights written to {self.weights_dir}")

    def bar(self) -> None:
        """The shipped model's per-attribute accuracy on the held-out combinations, into metrics.json."""
        from .classifier import load_classifier
        from .evaluate import GUIDANCE, SAMPLE_STEPS, SAMPLES_PER_PROMPT, scene_accuracy
        from .world import held_out_scenes

        backend = models.load_backend(device=self.device, folder=self.weights_dir)
        classifier = load_classifier(self.weights_dir)
        scores = scene_accuracy(backend, classifier, held_out_scenes(), progress=True)
        # the bar's own seconds are known only after this file is written (MODEL_CARD.md gives them)
        timings = {stage: seconds for stage, seconds in json.loads((self.run_dir / "timings.json").read_text()).items()
                   if stage != "bar"}
        metrics = {
            "model_hash": backend.model_hash,
            "base_bar": {"scenes": len(held_out_scenes()), "samples_per_prompt": SAMPLES_PER_PROMPT,
                         "guidance": GUIDANCE, "ddim_steps": SAMPLE_STEPS, "accuracy": scores},
            "classifier": json.loads((self.run_dir / "classifier-metrics.json").read_text()),
            "pretraining": {"settings": asdict(self.settings), "stage_seconds": timings},
        }
        (self.weights_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        self.log(f"base bar on {len(held_out_scenes())} held-out scenes: {scores}")


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-attribute accuracy of the classifier on uint8 images."""
    from .world import ATTRIBUTES

    predicted = torch.cat([model.predict(to_pixels(images[i:i + 500])) for i in range(0, len(images), 500)])
    correct = (predicted == torch.from_numpy(labels)).float().mean(dim=0)
    return {a: round(float(c), 4) for a, c in zip(ATTRIBUTES, correct)}


STAGES = ("text_encoder", "renders", "vae", "classifier", "latents", "unet", "export", "bar")
REDONE_EACH_RUN = ("export", "bar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dreamartist.toyworld.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="checkpoints and data (resumable)")
    parser.add_argument("--weights-dir", type=Path, default=models.WEIGHTS_DIR, help="where the finished model goes")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads and render processes (1 on a busy machine)")
    parser.add_argument("--device", default="cpu", help="where the UNet trains and the bar samples (cpu, cuda)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in order")
    for name, default in asdict(Settings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats in small gradients slow CPU kernels down many times
    settings = Settings(**{name: getattr(args, name) for name in asdict(Settings())})
    run = Pretraining(args.run_dir, settings, args.weights_dir, args.device, args.threads)
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stage(s): {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    timings_path = args.run_dir / "timings.json"
    for stage in stages:
        started, cpu_started = time.monotonic(), time.process_time()
        getattr(run, stage)()
        # Wall and CPU seconds per stage, summed over resumes (on a shared machine only the CPU time compares);
        # the stages that redo all their work on every run keep their last run's.
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        before = {} if stage in REDONE_EACH_RUN else timings.get(stage, {})
        wall, cpu = before.get("wall", 0.0), before.get("cpu", 0.0)
        timings[stage] = {"wall": round(wall + time.monotonic() - started, 1),
                          "cpu": round(cpu + time.process_time() - cpu_started, 1)}
        timings_path.write_text(json.dumps(timings, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
