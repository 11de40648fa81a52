"""A small CNN that reads a 64x64 toy-world image back into its four attributes, to score generated images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .world import ATTRIBUTES, VALUES

CLASSIFIER = dict(widths=[32, 48, 64, 64, 96, 96], strides=[1, 2, 2, 1, 2, 2], groups=8)


def _block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(groups, c_out), nn.SiLU())


class AttributeClassifier(nn.Module):
    """Convolutions down to 4x4, global average pooling, one linear head per attribute."""

    def __init__(self, widths: list[int], strides: list[int], groups: int) -> None:
        super().__init__()
        channels = [3, *widths]
        self.body = nn.Sequential(*(_block(channels[i], channels[i + 1], strides[i], groups)
                                    for i in range(len(widths))))
        self.heads = nn.ModuleDict({a: nn.Linear(widths[-1], len(VALUES[a])) for a in ATTRIBUTES})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pixels (B, 3, 64, 64) in [-1, 1] -> logits per attribute."""
        features = self.body(pixels).mean(dim=(2, 3))
        return {a: head(features) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Predicted value index per image and attribute: (N, 4) in ATTRIBUTES order."""
        pixels = images if isinstance(images, torch.Tensor) else images_to_pixels(images)
        logits = self(pixels.to(next(self.parameters()).device, torch.float32))
        return torch.stack([logits[a].argmax(dim=1) for a in ATTRIBUTES], dim=1).cpu()

    def describe(self, images: list[Image.Image]) -> list[dict[str, str]]:
        """The attribute values read from each image, as words."""
        return [{a: VALUES[a][int(i)] for a, i in zip(ATTRIBUTES, row)} for row in self.predict(images)]


def images_to_pixels(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def build_classifier(config: dict | None = None, seed: int | None = None) -> AttributeClassifier:
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return AttributeClassifier(**(config or CLASSIFIER))


def save_classifier(model: AttributeClassifier, folder: Path, config: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()},
              str(folder / "classifier.safetensors"))
    (folder / "classifier.json").write_text(json.dumps(config or CLASSIFIER, indent=1) + "\n", encoding="utf-8")


def load_classifier(folder: str | Path | None = None) -> AttributeClassifier:
    """The shipped attribute classifier (float32, eval mode)."""
    from safetensors.torch import load_file

    from .models import WEIGHTS_DIR

    folder = Path(folder) if folder else WEIGHTS_DIR
    config = json.loads((folder / "classifier.json").read_text(encoding="utf-8"))
    model = build_classifier(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "classifier.safetensors")).items()})
    return model.eval().requires_grad_(False)
