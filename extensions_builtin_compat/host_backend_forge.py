"""The Backend protocol over an SD1 model that Forge's own backend loaded (Forge Neo, original Forge), reusing the
loaded weights: prompts through the model's text-processing engine with the learned words registered in that
engine's embedding database (Forge's CLIPEmbeddingForTextualInversion splices ``vec`` in, so gradients reach it),
the UNet called directly for its eps or v output, the VAE's own encoder (the posterior mean; Forge's encode samples
it) and decoder. What Forge's loading leaves in the way of a backward pass is changed for the run only: inference
weights, in-place residuals, attention kernels without a backward (host_backend's contexts).
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from modules import devices

from dreamartist import adapters
from dreamartist.backend import EPSILON, V_PREDICTION, Conditioning, PatchSlot, WordVectors, checked_words, frozen
from dreamartist.errors import ModelError
from dreamartist.families import FAMILIES

from .host_backend import (
    MAX_INIT_TOKENS,
    attention_with_backward,
    checkpoint_names,
    checkpointed_blocks,
    float32_weights,
    forge_parts_loaded,
    ldm_checkpointing_off,
    normal_weights,
    norms_read_copies,
    registered_in,
    trainable_model,
)


def _token_table(engine) -> torch.nn.Module:
    """The engine's CLIPEmbeddingForTextualInversion (its ``wrapped`` is the token table)."""
    table = next((m for m in engine.text_encoder.modules() if hasattr(m, "wrapped") and hasattr(m, "embeddings")),
                 None)
    if table is None:
        raise ModelError("The text encoder has no textual-inversion layer from Forge; reload the checkpoint.")
    return table


class ForgeBackend(PatchSlot):
    """Training operations on ``shared.sd_model`` loaded by Forge's backend; see dreamartist.backend.Backend."""

    def __init__(self, sd_model=None):
        model = self.sd_model = trainable_model(sd_model)
        self.family = "sd1"
        self.image_size = FAMILIES[self.family].size
        self.engine = model.text_processing_engine
        self.table = _token_table(self.engine)
        self.key = self.engine.embedding_key
        self.embedding_dims = {self.key: self.table.weight.shape[1]}
        objects = model.forge_objects_original or model.forge_objects
        self.kmodel = objects.unet.model
        self.first_stage = objects.vae.first_stage_model
        self.text_encoder = objects.clip.cond_stage_model
        predictor = self.kmodel.predictor
        self.prediction_type = V_PREDICTION if predictor.prediction_type == "v_prediction" else EPSILON
        self.alphas_cumprod = predictor.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self.latent_channels = 4
        self.vae_scale = 8
        self.device = devices.device
        self.model_name, self.model_hash = checkpoint_names(model)

    # -- text ----------------------------------------------------------------------------------------
    def word_vectors(self, text: str) -> dict[str, torch.Tensor]:
        ids = self.engine.tokenize([text])[0][:MAX_INIT_TOKENS]
        return {self.key: self.table.wrapped.weight.detach()[ids].float().cpu().clone()}

    def eos_vector(self) -> dict[str, torch.Tensor]:
        return {self.key: self.table.wrapped.weight.detach()[self.engine.id_end].float().cpu().clone()}

    def _embedding(self, name: str, vector: dict[str, torch.Tensor]):
        embedding = importlib.import_module("backend.text_processing.textual_inversion").Embedding(vector[self.key],
                                                                                                 name)
        embedding.vectors, embedding.shape = vector[self.key].shape[0], vector[self.key].shape[1]
        return embedding

    def encode(self, prompts: list[str], words: WordVectors | None = None, branches: tuple = ()) -> Conditioning:
        """The engine's prompt encoding with ``words`` as temporary embeddings; differentiable in those only."""
        if branches and len(branches) != len(prompts):
            raise ValueError(f"{len(branches)} branches for {len(prompts)} prompts")
        db = self.engine.embeddings
        embeddings = {name: self._embedding(name, vector)
                      for name, vector in checked_words(words or {}, self.embedding_dims).items()}
        first_id = lambda name: self.engine.tokenize([name])[0][0]  # noqa: E731
        with registered_in(db, embeddings, first_id, db.register_embedding):
            cond = Conditioning(context=self._encoded(list(prompts)).float())
        cond.branches = tuple(branches)
        return cond

    def _encoded(self, prompts: list[str]) -> torch.Tensor:
        """The engine's own call without what belongs to a generation (a printed line per embedding used, and the
        "TI"/"Emphasis" notes it leaves for the next infotext): every 75-token chunk of every prompt through its
        process_tokens, side by side."""
        batch_chunks, _ = self.engine.process_texts(prompts)
        states = []
        for i in range(max(len(chunks) for chunks in batch_chunks)):
            chunk = [chunks[i] if i < len(chunks) else self.engine.empty_chunk() for chunks in batch_chunks]
            self.engine.embeddings.fixes = [c.fixes for c in chunk]
            states.append(self.engine.process_tokens([c.tokens for c in chunk], [c.multipliers for c in chunk]))
        return torch.hstack(states)

    # -- UNet and VAE --------------------------------------------------------------------------------
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if latents.shape[0] != len(cond):
            raise ValueError(f"{latents.shape[0]} latents for {len(cond)} conditioning rows")
        unet = self.kmodel.diffusion_model
        device, dtype = next(unet.parameters()).device, self.kmodel.computation_dtype
        out = unet(latents.to(device, dtype), timesteps.to(device).float(), context=cond.context.to(device, dtype),
                   transformer_options={})
        return out.float()

    def adapter_layers(self) -> dict[str, dict[str, torch.nn.Module]]:
        """None: the adapters would not act where Forge samples (host.adapters_unsupported_reason refuses them)."""
        return {adapters.UNET: {}, adapters.TEXT: {}}

    def _vae_input(self, tensor: torch.Tensor) -> torch.Tensor:
        weight = next(self.first_stage.parameters())
        return tensor.to(weight.device, weight.dtype)

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior mean through the first stage's encoder, scaled as Forge's process_in does; no gradient."""
        with torch.no_grad():
            moments = self.first_stage.encoder(self._vae_input(pixels))
            if getattr(self.first_stage, "quant_conv", None) is not None:
                moments = self.first_stage.quant_conv(moments)
            mean = moments.chunk(2, dim=1)[0]
            return self.first_stage.process_in(mean).float().clone()

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(self.first_stage.process_out(self._vae_input(latents))).float()

    # -- the training context ------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        parts = (self.kmodel, self.text_encoder, self.first_stage)
        unet = self.kmodel.diffusion_model
        with forge_parts_loaded(self.sd_model, inference=True), normal_weights(*parts), frozen(*parts), \
                ldm_checkpointing_off(unet), checkpointed_blocks(unet, gradient_checkpointing), \
                norms_read_copies(unet), attention_with_backward(), float32_weights(self.first_stage):
            yield
