"""A Backend of plain torch modules (no diffusers, no transformers): runs the training loop under any torch,
including the older ones the webuis ship, with the same file and optimiser round trips as the real models.

Text: a token table over a letter vocabulary, pseudo-words spliced in where their letters stand; a one-layer
attention encoder. UNet: a conv stem, cross-attention to the text, a conv head. VAE: 8x pixel shuffle both ways.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dreamartist.backend import EPSILON, Conditioning, frozen
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

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings + self.position
        return x + self.attention(x, x, x, need_weights=False)[0]


class _UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, DIM, 3, padding=1)
        self.time = nn.Linear(1, DIM)
        self.cross = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.head = nn.Conv2d(DIM, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) + self.time(t.float().view(-1, 1) / 1000).view(-1, DIM, 1, 1)
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, hw, C)
        tokens = tokens + self.cross(tokens, context, context, need_weights=False)[0]
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


class TinyBackend:
    """The Backend protocol over three small seeded modules; see dreamartist.backend."""

    family = "sd1"
    prediction_type = EPSILON
    latent_channels = 4
    vae_scale = 8
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
        return Conditioning(context=self.text(torch.stack(rows)), branches=tuple(branches))

    def unet(self, latents, timesteps, cond) -> torch.Tensor:
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
