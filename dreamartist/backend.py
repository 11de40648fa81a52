"""The few operations training and sampling need from a Stable Diffusion model.

Two implementations exist: the webui's loaded model (``extensions_builtin_compat.host_backend``) and the
standalone diffusers model (``dreamartist.standalone``). The core never imports either.

Learned words are passed as ``WordVectors``: for each pseudo-word, one tensor per text encoder, keyed by
the encoder's name ("clip_l" for SD1, "clip_h" for SD2, "clip_l" and "clip_g" for SDXL). A prompt names the word
as plain text ("a photo of walle"); the backend splices the vectors in at that position, as the webui does
for textual-inversion embeddings, so gradients reach those tensors and nothing else.
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .adapters import Adapter, installed
from .errors import InputError

EncoderVectors = Mapping[str, torch.Tensor]  # encoder key -> (n_vectors, dim)
WordVectors = Mapping[str, EncoderVectors]  # pseudo-word -> its vectors for every text encoder

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
POOLED = "pooled"  # Conditioning.extras: SDXL's pooled text embedding (OpenCLIP-G's projected EOS state), (rows, dim)
TIME_IDS = "time_ids"  # Conditioning.extras: SDXL's size conditioning (dreamartist.size_conditioning), (rows, 6)


@dataclass
class Conditioning:
    """Text conditioning for one UNet call, one row per prompt.

    ``branches`` labels each row for per-row adapters (dreamartist.adapters): the ids of the adapters acting on
    it, "pos" or "neg" in training ("" or empty: none). The backend labels the rows of its UNet call with it.
    ``extras`` carries what some families add beside the cross-attention states: SDXL's POOLED text embedding
    (from ``encode``) and TIME_IDS (set by the caller; a backend that needs them and finds none uses sampling's
    defaults for the latents' size). Backends of other families ignore them.
    """

    context: torch.Tensor  # (rows, tokens, dim)
    branches: tuple = ()
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.context.shape[0]


@runtime_checkable
class Backend(Protocol):
    family: str  # "sd1" | "sd2" | "sdxl"
    device: torch.device
    prediction_type: str  # EPSILON | V_PREDICTION
    alphas_cumprod: torch.Tensor  # (T,) float32, on the CPU
    embedding_dims: Mapping[str, int]  # encoder key -> token-embedding width
    latent_channels: int
    vae_scale: int  # pixels per latent cell (8)
    image_size: int  # the side the model was trained at: what a width or height of 0 stands for
    model_name: str
    model_hash: str  # short hash of the checkpoint, "" when unknown

    def word_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Raw token embeddings of ``text`` (no BOS/EOS), per encoder: (n_tokens, dim), detached."""

    def eos_vector(self) -> dict[str, torch.Tensor]:
        """The end-of-text token embedding per encoder: (dim,), detached."""

    def encode(self, prompts: list[str], words: WordVectors | None = None,
               branches: tuple = ()) -> Conditioning:
        """Encode prompts with ``words`` spliced in; differentiable with respect to those vectors only."""

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call: latents (B,C,h,w), integer timesteps (B,), B == len(cond). Returns the model
        output (eps or v, per ``prediction_type``) as float32, differentiable."""

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> scaled latents (B,C,H/8,W/8), float32, no gradient."""

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1,1] (B,3,H,W), float32, WITH gradient (eq. 6 needs it)."""

    def training(self, gradient_checkpointing: bool = False) -> contextlib.AbstractContextManager:
        """Context for a training run: every model weight frozen, optional gradient checkpointing; on exit
        (also on error) the model is exactly as before: weights, requires_grad, modes, hooks."""

    def adapter_layers(self) -> dict[str, dict[str, torch.nn.Module]]:
        """The layers adapters may act on: part ("unet", "te") -> canonical name -> module."""

    def patched(self, adapters: Mapping[str, Mapping[str, tuple[Adapter, float]]], dropout: float = 0.0,
                training: bool = False) -> contextlib.AbstractContextManager:
        """The patch slot: install per-row adapters (part -> adapter id -> (adapter, strength)) on the model for
        a with-block; removed on exit and on error."""


def checked_words(words: WordVectors, embedding_dims: Mapping[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """``words`` restricted to the model's text encoders, each (n, width) with the same n for every encoder;
    InputError naming the word otherwise."""
    checked = {}
    for word, per_encoder in words.items():
        for key, width in embedding_dims.items():
            if key not in per_encoder:
                raise InputError(f"The embedding '{word}' has no vectors for this model's text encoder ({key}).")
            vector = per_encoder[key]
            if vector.ndim != 2 or vector.shape[1] != width:
                raise InputError(f"The embedding '{word}' has vectors of shape {tuple(vector.shape)}, "
                                 f"but this model needs (n, {width}).")
        if len({per_encoder[key].shape[0] for key in embedding_dims}) > 1:
            raise InputError(f"The embedding '{word}' has a different number of vectors per text encoder.")
        checked[word] = {key: per_encoder[key] for key in embedding_dims}
    return checked


class PatchSlot(abc.ABC):
    """``Backend.patched`` for any backend that lists its ``adapter_layers``."""

    @abc.abstractmethod
    def adapter_layers(self) -> dict[str, dict[str, torch.nn.Module]]:
        """Part ("unet", "te") -> canonical layer name -> module."""

    @contextlib.contextmanager
    def patched(self, adapters: Mapping[str, Mapping[str, tuple[Adapter, float]]], dropout: float = 0.0,
                training: bool = False) -> Iterator[None]:
        layers = self.adapter_layers()
        with contextlib.ExitStack() as stack:
            for part, acting in adapters.items():
                if acting:
                    stack.enter_context(installed(layers[part], acting, dropout, training))
            yield


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Freeze every parameter of ``modules`` and restore each flag (and train/eval mode) on exit."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        for root in modules:
            root.eval()
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)
