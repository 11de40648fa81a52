"""A Backend of plain torch modules (no diffusers, no transformers): runs the training loop under any torch,
including the older ones the webuis ship, with the same file and optimiser round trips as the real models.

Text: a token table over a letter vocabulary, pseudo-words spliced in where their letters stand; a one-layer
attention encoder. UNet: a conv stem, cross-attention to the text, a conv head. VAE: 8x pixel shuffle both ways.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dreamartist import adapters
from dreamartist.backend import EPSILON, Conditioning, PatchSlot, frozen
from dreamartist.prompts import WordFinder, chunk_prompt, empty_chunk

DIM, CONTEXT = 16, 77
BOS, EOS, COMMA = 27, 28, 29


def letters(text: str) -> list[int]:
    """One token per letter a-z (1-26), ',' = COMMA; anything else is dropped."""
    return [COMMA if c == "," else ord(c) - 96 for c in text.lower() if "a" <= c <= "z" or c == ","]


class _Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(32, DIM)
        self.position = nn.Parameter(torch.randn(CONTEXT, DIM) * 0.02)
        self.attention = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings + self.position
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(x)))


class _UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, DIM, 3, padding=1)
        self.time = nn.Linear(1, DIM)
        self.to_k, self.to_v = nn.Linear(DIM, DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        self.cross = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.head = nn.Conv2d(DIM, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) + self.time(t.float().view(-1, 1) / 1000).view(-1, DIM, 1, 1)
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, hw, C)
        tokens = tokens + self.cross(tokens, self.to_k(context), self.to_v(context), need_weights=False)[0]
        return self.head(tokens.transpose(1, 2).reshape(b, c, height, width))


class _VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3 * 64, 4, 1)
        self.up = nn.Conv2d(4, 3 * 64, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.pixel_unshuffle(pixels, 8))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pixel_shuffle(self.up(latents), 8)


class TinyBackend(PatchSlot):
    """The Backend protocol over three small seeded modules; see dreamartist.backend."""

    family = "sd1"
    prediction_type = EPSILON
    latent_channels = 4
    vae_scale = 8
    image_size = 512
    model_name = "tiny"
    model_hash = "tiny"
    device = torch.device("cpu")

    def __init__(self, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.text, self.unet_model, self.vae = _Text(), _UNet(), _VAE()
        self.modules = (self.text, self.unet_model, self.vae)
        for module in self.modules:
            module.eval().requires_grad_(False)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
        self.embedding_dims = {"clip_l": DIM}

    def word_vectors(self, text: str) -> dict[str, torch.Tensor]:
        return {"clip_l": self.text.table.weight.detach()[letters(text)].clone()}

    def eos_vector(self) -> dict[str, torch.Tensor]:
        return {"clip_l": self.text.table.weight.detach()[EOS].clone()}

    def adapter_layers(self) -> dict[str, dict[str, nn.Module]]:
        block = "mid_block.attentions.0.transformer_blocks.0.attn2."
        layer = "text_model.encoder.layers.0.mlp."
        return {adapters.UNET: {block + "to_k": self.unet_model.to_k, block + "to_v": self.unet_model.to_v},
                adapters.TEXT: {layer + "fc1": self.text.fc1, layer + "fc2": self.text.fc2}}

    def encode(self, prompts, words=None, branches=()) -> Conditioning:
        vectors = {word: v["clip_l"] for word, v in (words or {}).items()}
        finder = WordFinder({word: v.shape[0] for word, v in vectors.items()}, letters)
        rows = []
        for prompt in prompts:
            chunk = (chunk_prompt(prompt, letters, finder, bos=BOS, eos=EOS, comma=COMMA) or [empty_chunk(BOS, EOS)])[0]
            row = self.text.table(torch.tensor(chunk.tokens))
            for offset, word in chunk.words:
                row = torch.cat([row[:offset + 1], vectors[word], row[offset + 1 + vectors[word].shape[0]:]])
            rows.append(row)
        with adapters.row_labels(branches or None):
            return Conditioning(context=self.text(torch.stack(rows)), branches=tuple(branches))

    def unet(self, latents, timesteps, cond) -> torch.Tensor:
        with adapters.row_labels(cond.branches or None):
            return self.unet_model(latents, timesteps, cond.context).float()

    def vae_encode(self, pixels) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(pixels)

    def vae_decode(self, latents) -> torch.Tensor:
        return self.vae.decode(latents)

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False):
        with frozen(*self.modules):
            yield
