"""The Backend protocol over an SD1 or SDXL model that Forge's own backend loaded (Forge Neo, original Forge), reusing
the loaded weights: prompts through the model's text-processing engines (SDXL: CLIP-L's and CLIP-G's) with the
learned words registered in each engine's embedding database (Forge's CLIPEmbeddingForTextualInversion splices
``vec`` in, so gradients reach it), the UNet called directly for its eps or v output (SDXL: with the "vector"
Forge's conditioning builds), the VAE's own encoder (the posterior mean; Forge's encode samples it) and decoder.
What Forge's loading leaves in the way of a backward pass is changed for the run only: inference weights, in-place
residuals, attention kernels without a backward (host_backend's contexts).
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from modules import devices

from dreamartist import adapters, size_conditioning
from dreamartist.attributes import attributes_restored
from dreamartist.backend import (
    EPSILON,
    POOLED,
    TIME_IDS,
    V_PREDICTION,
    Conditioning,
    PatchSlot,
    WordVectors,
    checked_words,
    frozen,
)
from dreamartist.errors import ModelError
from dreamartist.families import FAMILIES

from . import host
from .host_backend import (
    MAX_INIT_TOKENS,
    attention_with_backward,
    checkpoint_names,
    checkpointed_blocks,
    embeddings_registered,
    float32_weights,
    float32_where_cast,
    forge_parts_loaded,
    layers_of,
    ldm_checkpointing_off,
    normal_weights,
    norms_read_copies,
    pooled_on_views,
    token_widths,
    trainable_model,
)


@contextlib.contextmanager
def _own_emphasis(engine) -> Iterator[None]:
    """A fresh emphasis object of the engine's kind for one encode, as the engine's own call makes one; the engine's
    is put back after. The object keeps the encode's output (``emphasis.z``): left on the engine, a training encode's
    would hold its graph, and the trained values with it, until the next generation."""
    own = vars(engine).get("emphasis")
    if own is None:
        yield
        return
    with attributes_restored([(engine, "emphasis")]):
        engine.emphasis = type(own)()
        yield


def token_table(engine) -> torch.nn.Module:
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
        self.family = "sdxl" if getattr(model, "is_sdxl", False) else "sd1"
        self.image_size = FAMILIES[self.family].size
        # key -> engine in the order their states are concatenated (SDXL: CLIP-L's, then CLIP-G's)
        self.engines = {engine.embedding_key: engine for engine in host.text_engines(model)}
        self.tables = {key: token_table(engine) for key, engine in self.engines.items()}
        self.embedding_dims = token_widths(model)
        objects = model.forge_objects_original or model.forge_objects
        self.kmodel = objects.unet.model
        self.first_stage = objects.vae.first_stage_model
        self.text_encoder = objects.clip.cond_stage_model
        self.size_embedder = getattr(model, "embedder", None)  # SDXL: each size number's sinusoidal embedding
        predictor = self.kmodel.predictor
        self.prediction_type = V_PREDICTION if predictor.prediction_type == "v_prediction" else EPSILON
        self.alphas_cumprod = predictor.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self.latent_channels = 4
        self.vae_scale = 8
        self.device = devices.device
        self.model_name, self.model_hash = checkpoint_names(model)

    # -- text ----------------------------------------------------------------------------------------
    def word_vectors(self, text: str) -> dict[str, torch.Tensor]:
        return {key: self.tables[key].wrapped.weight.detach()[engine.tokenize([text])[0][:MAX_INIT_TOKENS]]
                .float().cpu().clone() for key, engine in self.engines.items()}

    def eos_vector(self) -> dict[str, torch.Tensor]:
        return {key: self.tables[key].wrapped.weight.detach()[engine.id_end].float().cpu().clone()
                for key, engine in self.engines.items()}

    def _embedding(self, name: str, vector: dict[str, torch.Tensor]):
        """An Embedding as Forge's loader makes one: SD1's tensor, or SDXL's {"clip_l", "clip_g"} dict (each engine
        splices its own key) with the widths summed as its shape."""
        vec = vector if len(self.engines) > 1 else next(iter(vector.values()))
        embedding = importlib.import_module("backend.text_processing.textual_inversion").Embedding(vec, name)
        embedding.vectors = next(iter(vector.values())).shape[0]
        embedding.shape = sum(v.shape[1] for v in vector.values())
        return embedding

    def encode(self, prompts: list[str], words: WordVectors | None = None, branches: tuple = ()) -> Conditioning:
        """The engines' prompt encoding with ``words`` as temporary embeddings; differentiable in those only. SDXL:
        both engines' states side by side, and CLIP-G's pooled output of the first chunk, as its conditioning
        does."""
        if branches and len(branches) != len(prompts):
            raise ValueError(f"{len(branches)} branches for {len(prompts)} prompts")
        embeddings = {name: self._embedding(name, vector)
                      for name, vector in checked_words(words or {}, self.embedding_dims).items()}
        contexts, pooled = [], None
        with contextlib.ExitStack() as stack:
            stack.enter_context(adapters.row_labels(branches or None))
            stack.enter_context(embeddings_registered(self.sd_model, embeddings))
            for engine in self.engines.values():
                context, first_pooled = self._encoded(engine, list(prompts))
                contexts.append(context)
                pooled = first_pooled if first_pooled is not None else pooled
        length = max(c.shape[1] for c in contexts)  # Forge pads the shorter engine's states with zeros
        contexts = [torch.cat([c, c.new_zeros(c.shape[0], length - c.shape[1], c.shape[2])], dim=1) for c in contexts]
        cond = Conditioning(context=torch.cat(contexts, dim=2).float(),
                            extras={} if pooled is None else {POOLED: pooled.float()})
        cond.branches = tuple(branches)
        return cond

    @staticmethod
    def _encoded(engine, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The engine's own call without what belongs to a generation (a printed line per embedding used, and the
        "TI"/"Emphasis" notes it leaves for the next infotext): every 75-token chunk of every prompt through its
        process_tokens, side by side; and the first chunk's pooled output where the engine makes one."""
        batch_chunks, _ = engine.process_texts(prompts)
        states = []
        with _own_emphasis(engine):
            for i in range(max(len(chunks) for chunks in batch_chunks)):
                chunk = [chunks[i] if i < len(chunks) else engine.empty_chunk() for chunks in batch_chunks]
                engine.embeddings.fixes = [c.fixes for c in chunk]
                states.append(engine.process_tokens([c.tokens for c in chunk], [c.multipliers for c in chunk]))
        return torch.hstack(states), getattr(states[0], "pooled", None)

    # -- UNet and VAE --------------------------------------------------------------------------------
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if latents.shape[0] != len(cond):
            raise ValueError(f"{latents.shape[0]} latents for {len(cond)} conditioning rows")
        unet = self.kmodel.diffusion_model
        device, dtype = next(unet.parameters()).device, self.kmodel.computation_dtype
        extra = {} if self.size_embedder is None else {"y": self._vector(latents, cond).to(device, dtype)}
        with adapters.row_labels(cond.branches or None):
            out = unet(latents.to(device, dtype), timesteps.to(device).float(),
                       context=cond.context.to(device, dtype), transformer_options={}, **extra)
        return out.float()

    def _vector(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """SDXL's "vector": the pooled text embedding, then the embedding of each of the six size numbers (sampling's
        defaults for the latents' size when the caller set none), as Forge's conditioning builds it."""
        ids = size_conditioning.for_latents(cond.extras.get(TIME_IDS), latents, self.vae_scale)
        sizes = self.size_embedder(ids.reshape(-1).float()).reshape(ids.shape[0], -1)
        return torch.cat([cond.extras[POOLED].to(sizes), sizes], dim=1)

    def adapter_layers(self) -> dict[str, dict[str, torch.nn.Module]]:
        return layers_of(self.sd_model)

    def controlled_attention(self, controller, calls) -> contextlib.AbstractContextManager:
        """Every attention layer of the backend's UNet under ``controller`` for a with-block (host_attention)."""
        from .host_attention import ldm_control

        return ldm_control(self.kmodel.diffusion_model, controller, calls)

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
                norms_read_copies(unet), attention_with_backward(), float32_weights(self.first_stage), \
                float32_where_cast(self.text_encoder), \
                pooled_on_views(self.engines.values()):
            yield
