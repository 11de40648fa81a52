"""The Backend protocol over the webui's loaded SD1/SD2 model (ldm LatentDiffusion behind the webui's hijack); SDXL
(sgm's DiffusionEngine) builds on it in host_backend_sdxl.

Learned words go through the webui's own path: each is registered for the duration of one encode call as a
textual-inversion Embedding whose ``vec`` IS the learned tensor (for SDXL a dict of the clip_l and clip_g tensors,
as the webui holds SDXL embeddings), so the webui's chunking, emphasis and EmbeddingsWithFixes splice it in
exactly as at generation time and gradients reach that tensor.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from modules import devices, extra_networks, processing, sd_models, shared
from modules.textual_inversion.textual_inversion import Embedding

from dreamartist import adapters
from dreamartist.attributes import attributes_restored
from dreamartist.backend import EPSILON, V_PREDICTION, Conditioning, PatchSlot, WordVectors, checked_words, frozen
from dreamartist.errors import ModelError
from dreamartist.families import FAMILIES
from dreamartist.layer_names import named_layers, text_layers, unet_name

from . import host

MAX_INIT_TOKENS = 75  # one prompt chunk


def _fixes(encoder: torch.nn.Module):
    """The hijack's EmbeddingsWithFixes inside a prompt encoder (its ``wrapped`` is the token table); None also
    where the host has no hijack (Forge Neo)."""
    fixes_class = getattr(host.sd_hijack(), "EmbeddingsWithFixes", None)
    if fixes_class is None:
        return None
    return next((m for m in encoder.modules() if isinstance(m, fixes_class)), None)


def model_family(sd_model) -> str:
    """"sdxl", "sd2" or "sd1". SD 2.x also by its prompt encoder, ldm's FrozenOpenCLIPEmbedder: reForge and Forge
    Classic set ``is_sd2`` after wrapping that encoder in a class without the ``model`` they look for, so their SD 2.x
    models say ``is_sd1``."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    encoder = getattr(getattr(sd_model, "cond_stage_model", None), "wrapped", None)
    if getattr(sd_model, "is_sd2", False) or type(encoder).__name__ == "FrozenOpenCLIPEmbedder":
        return "sd2"
    return "sd1"


def unet_of(sd_model) -> torch.nn.Module:
    """The UNet module generation runs: the webui model's (reForge and Forge Classic share theirs with their
    backend's patcher), or, on a model Forge's own backend loaded (Neo), that of its UNet patcher."""
    if host.runs_forge_engine(sd_model):
        return sd_model.forge_objects.unet.model.diffusion_model
    return sd_model.model.diffusion_model


def text_encoders(sd_model) -> dict[str, torch.nn.Module]:
    """The prompt encoders of a loaded model by encoder key: SD1/SD2's cond_stage_model; SDXL's conditioner
    embedders, each known by the key its EmbeddingsWithFixes splices ("clip_l", "clip_g"), in the conditioner's
    order (the order in which their outputs are concatenated); on a model Forge's own backend loaded (Neo), the
    transformer each text engine runs on its token ids."""
    if host.runs_forge_engine(sd_model):
        return {engine.embedding_key: engine.text_encoder.transformer for engine in host.text_engines(sd_model)}
    family = model_family(sd_model)
    if family != "sdxl":
        (key,) = FAMILIES[family].widths
        return {key: sd_model.cond_stage_model}
    return {fixes.textual_inversion_key: embedder for embedder in sd_model.conditioner.embedders
            if (fixes := _fixes(embedder)) is not None}


def token_widths(sd_model) -> dict[str, int]:
    """Each prompt encoder's token width by encoder key (what an embedding's vectors for it must have)."""
    if host.runs_forge_engine(sd_model):
        from .host_backend_forge import token_table

        return {engine.embedding_key: int(token_table(engine).wrapped.weight.shape[1])
                for engine in host.text_engines(sd_model)}
    return {key: int(_fixes(encoder).wrapped.weight.shape[1]) for key, encoder in text_encoders(sd_model).items()}


def timestep_count(sd_model) -> int:
    """The number of diffusion timesteps the model was trained with (its schedule's length)."""
    if host.runs_forge_engine(sd_model):
        return int(sd_model.forge_objects.unet.model.predictor.alphas_cumprod.shape[0])
    return int(sd_model.alphas_cumprod.shape[0])


def training_alphas(sd_model) -> torch.Tensor:
    """The schedule the webui samples with, float32 on the CPU: the fp32 original that 1.8+ keeps beside a downcast
    copy, rescaled to zero terminal SNR when its noise-schedule setting (1.8+) asks for it."""
    alphas = getattr(sd_model, "alphas_cumprod_original", None)
    alphas = (sd_model.alphas_cumprod if alphas is None else alphas).detach().to("cpu", torch.float32).clone()
    if getattr(shared.opts, "sd_noise_schedule", "Default") == "Zero Terminal SNR":
        alphas = sd_models.rescale_zero_terminal_snr_abar(alphas)
    return alphas


def checkpoint_names(sd_model) -> tuple[str, str]:
    """The loaded checkpoint's name and short hash, as the webui shows them ("" when unknown)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "name_for_extra", None) or getattr(info, "model_name", None) or ""
    return name, getattr(sd_model, "sd_model_hash", None) or getattr(info, "shorthash", None) or ""


@contextlib.contextmanager
def registered_in(db, embeddings: Mapping[str, object], first_id, register) -> Iterator[None]:
    """Each of ``embeddings`` (name -> the host's Embedding over a live tensor) registered in the textual-inversion
    database ``db`` by ``register``; the database put back exactly after (its names, and the lookup lists under each
    name's first token id, ``first_id(name)``)."""
    saved_words = dict(db.word_embeddings)
    saved_lookup: dict[int, list | None] = {}
    try:
        for name, embedding in embeddings.items():
            key = first_id(name)
            if key not in saved_lookup:
                entries = db.ids_lookup.get(key)
                saved_lookup[key] = None if entries is None else list(entries)
            register(embedding)
        yield
    finally:
        db.word_embeddings.clear()
        db.word_embeddings.update(saved_words)
        for key, entries in saved_lookup.items():
            if entries is None:
                db.ids_lookup.pop(key, None)
            else:
                db.ids_lookup[key] = entries


@contextlib.contextmanager
def embeddings_registered(sd_model, embeddings: Mapping[str, object]) -> Iterator[None]:
    """``embeddings`` (name -> the host's Embedding) known to the host's prompt parsing for the with-block, as any
    embedding is: in the webui's database, or, on a model Forge's own backend loaded, in each text engine's."""
    with contextlib.ExitStack() as stack:
        if host.runs_forge_engine(sd_model):
            for engine in host.text_engines(sd_model):
                first_id = lambda name, engine=engine: engine.tokenize([name])[0][0]  # noqa: E731
                stack.enter_context(registered_in(engine.embeddings, embeddings, first_id,
                                                  engine.embeddings.register_embedding))
        else:
            db, encoder = host.embedding_db(), sd_model.cond_stage_model
            stack.enter_context(registered_in(db, embeddings, lambda name: encoder.tokenize([name])[0][0],
                                              functools.partial(db.register_embedding, model=sd_model)))
        yield


def trainable_model(sd_model=None):
    """``sd_model`` (default: the loaded one) when it can be trained on here; else ModelError with the reason."""
    model = shared.sd_model if sd_model is None else sd_model
    reason = host.host_unsupported_reason() or host.model_unsupported_reason(model)
    if reason:
        raise ModelError(reason)
    return model


class HostBackend(PatchSlot):
    """Training and sampling operations on ``shared.sd_model``; see dreamartist.backend.Backend."""

    def __init__(self, sd_model=None):
        model = self.sd_model = trainable_model(sd_model)
        self.clip = model.cond_stage_model
        self.db = host.embedding_db()
        self.family = model_family(model)
        self.image_size = FAMILIES[self.family].size
        self.encoders = text_encoders(model)
        fixes = {key: _fixes(encoder) for key, encoder in self.encoders.items()}
        if set(self.encoders) != set(FAMILIES[self.family].widths) or None in fixes.values():
            raise ModelError("The text encoder is not hijacked by the webui; reload the checkpoint and try again.")
        self.token_tables = {key: fix.wrapped for key, fix in fixes.items()}
        self.embedding_dims = token_widths(model)
        self.eos_id = next(iter(self.encoders.values())).id_end  # CLIP's and OpenCLIP's vocabularies agree
        self.device = devices.device
        self.prediction_type = V_PREDICTION if getattr(model, "parameterization", "eps") == "v" else EPSILON
        self.alphas_cumprod = training_alphas(model)  # (T,)
        self.latent_channels = int(getattr(model, "latent_channels", 4))
        self.vae_scale = 8
        self.model_name, self.model_hash = checkpoint_names(model)

    # -- text ----------------------------------------------------------------------------------------
    def word_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Raw token embeddings of ``text`` (no BOS/EOS) as the webui computes them: (n_tokens, dim) per encoder, CPU.
        The SDXL conditioner returns both encoders' rows side by side, in the order of ``embedding_dims``."""
        with torch.no_grad():
            rows = self.clip.encode_embedding_init_text(text, MAX_INIT_TOKENS)
        widths = list(self.embedding_dims.values())
        parts = rows.detach().float().cpu().reshape(-1, sum(widths)).split(widths, dim=1)
        return {key: part.contiguous() for key, part in zip(self.embedding_dims, parts, strict=True)}

    def eos_vector(self) -> dict[str, torch.Tensor]:
        return {key: table.weight.detach()[self.eos_id].float().cpu().clone()
                for key, table in self.token_tables.items()}

    def _embedding(self, name: str, vector: Mapping[str, torch.Tensor]) -> Embedding:
        tensors = list(vector.values())
        embedding = Embedding(tensors[0] if len(tensors) == 1 else dict(vector), name)  # SDXL: a dict
        embedding.vectors, embedding.shape = tensors[0].shape[0], sum(t.shape[1] for t in tensors)
        return embedding

    def encode(self, prompts: list[str], words: WordVectors | None = None,
               branches: tuple = ()) -> Conditioning:
        """The webui's prompt encoding with ``words`` as temporary embeddings; differentiable in those only."""
        if branches and len(branches) != len(prompts):
            raise ValueError(f"{len(branches)} branches for {len(prompts)} prompts")
        embeddings = {name: self._embedding(name, vector)
                      for name, vector in checked_words(words or {}, self.embedding_dims).items()}
        with embeddings_registered(self.sd_model, embeddings), devices.autocast(), \
                adapters.row_labels(branches or None):
            cond = self._text_conditioning(list(prompts))
        cond.branches = tuple(branches)
        return cond

    def _text_conditioning(self, prompts: list[str]) -> Conditioning:
        return Conditioning(context=self.clip(prompts))  # (B, 77k, dim)

    # -- UNet and VAE --------------------------------------------------------------------------------
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if latents.shape[0] != len(cond):
            raise ValueError(f"{latents.shape[0]} latents for {len(cond)} conditioning rows")
        x = latents.to(self.device, devices.dtype_unet)
        with devices.autocast(), adapters.row_labels(cond.branches or None):
            out = self.sd_model.apply_model(x, timesteps.to(self.device), self._unet_cond(latents, cond))
        return out.float()

    def _unet_cond(self, latents: torch.Tensor, cond: Conditioning) -> dict:
        """The cond dict ``apply_model`` takes."""
        return {"c_crossattn": [cond.context.to(self.device, devices.dtype_unet)]}

    def adapter_layers(self) -> dict[str, dict[str, torch.nn.Module]]:
        return layers_of(self.sd_model)

    def controlled_attention(self, controller, calls) -> contextlib.AbstractContextManager:
        """Every attention layer of the UNet generation runs under ``controller`` for a with-block, whatever
        cross-attention optimisation the webui applied (host_attention; dreamartist.attention_control)."""
        from .host_attention import ldm_control

        return ldm_control(unet_of(self.sd_model), controller, calls)

    def _vae_dtype(self) -> torch.dtype:
        return next(self.sd_model.first_stage_model.parameters()).dtype

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior mode (its mean) times scale_factor: deterministic, no gradient, in the VAE's own dtype
        (float32 during training) with autocast off."""
        with torch.no_grad(), devices.without_autocast(), posterior_mode(self.sd_model.first_stage_model):
            posterior = self.sd_model.encode_first_stage(pixels.to(self.device, self._vae_dtype()))
            # ldm's posterior (its mean); reForge's encode_first_stage returns the latents as a tensor, whose own
            # mode() is the statistical one
            mode = posterior if isinstance(posterior, torch.Tensor) else posterior.mode()
            # clone(): reForge's encode_first_stage runs in inference mode, and an inference tensor cannot be saved
            # for backward wherever the target meets the prediction.
            return self.sd_model.get_first_stage_encoding(mode).float().clone()

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """first_stage_model.decode directly (decode_first_stage is no_grad; eq. 6 needs the gradient), in the
        VAE's own dtype with autocast off: an fp16 decode of a rough z0 estimate can overflow."""
        z = (latents.to(self.device) / self.sd_model.scale_factor).to(self._vae_dtype())
        with devices.without_autocast():
            return self.sd_model.first_stage_model.decode(z).float()

    # -- the training context ------------------------------------------------------------------------
    def _unload_networks(self) -> None:
        """Deactivate every extra network as sd_models.get_empty_cond does, so LoRA weights merged in by an
        earlier generation are restored to the checkpoint's on each layer's next forward."""
        extra_networks.activate(processing.StableDiffusionProcessingTxt2Img(), {})
        networks = sys.modules.get("networks")  # the built-in Lora extension's module, when present
        if networks is not None and getattr(networks, "loaded_networks", None):
            raise ModelError("A LoRA is still active on the model; set Settings > Extra Networks > \"Add network "
                             "to prompt\" to None and generate once without <lora:...> tags, then train.")

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        """Freeze every weight (the webui leaves the UNet trainable), switch off ldm's own checkpointing (1.6.0
        loads SD1/SD2 with use_checkpoint: True, and ldm's checkpoint differentiates frozen weights), optionally
        checkpoint the blocks our way, and follow the webui's "Use cross attention optimizations while training"
        setting; undo all on exit."""
        sd_hijack = host.sd_hijack()
        # as the webui's own Train tab does; reForge's and Forge Classic's hijacks have no optimisations of their own
        # to undo (and Classic has no such setting)
        undo_attention = callable(getattr(sd_hijack, "undo_optimizations", None)) and \
            not shared.opts.training_xattention_optimizations
        self._unload_networks()
        unet = self.sd_model.model.diffusion_model
        with forge_parts_loaded(self.sd_model), normal_weights(self.sd_model), frozen(self.sd_model), \
                ldm_checkpointing_off(unet), checkpointed_blocks(unet, gradient_checkpointing), \
                norms_read_copies(unet), attention_with_backward(), float32_weights(self.sd_model.first_stage_model), \
                float32_where_cast(*self.encoders.values()), pooled_on_views(self.encoders.values()):
            if undo_attention:
                sd_hijack.undo_optimizations()
            try:
                yield
            finally:
                if undo_attention:
                    sd_hijack.apply_optimizations()


@contextlib.contextmanager
def pooled_on_views(encoders: Iterable[object]) -> Iterator[None]:
    """The Forge family's SDXL CLIP-G (reForge's and Classic's modules_forge.forge_clip, Neo's text engine) hangs its
    pooled output on the hidden state it returns, which the encoder's next layer saved for backward: with a gradient,
    an encode whose pooled output the loss does not reach (an identity's V variants) then holds its own graph, and the
    trained values with it, out of reach of Python's collector (in a real Forge Classic a two-step SDXL identity left
    its 1 GB block behind, and the resume after it was killed for memory). For the run, each encoder hands on a view of
    its state that carries the pooled output, and the state itself keeps none; their own method is put back after."""
    name = "encode_with_transformers"
    encoders = [encoder for encoder in encoders if callable(getattr(encoder, name, None))]
    with attributes_restored((encoder, name) for encoder in encoders):
        for encoder in encoders:
            setattr(encoder, name, _pooled_on_a_view(getattr(encoder, name)))
        yield


def _pooled_on_a_view(encode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode_with_transformers(tokens: torch.Tensor) -> torch.Tensor:
        z = encode(tokens)
        pooled = z.__dict__.pop("pooled", None)
        if pooled is None:
            return z
        view = z.view_as(z)  # a tensor of its own, which no node of the graph saved
        view.pooled = pooled
        return view
    return encode_with_transformers


@contextlib.contextmanager
def posterior_mode(first_stage: torch.nn.Module) -> Iterator[None]:
    """ldm_patched's VAE (the Forge family's webui model object) passes its posterior through a regularizer that
    samples it when its ``sample`` is on (Forge Classic's; reForge's is off): off for the with-block, so an encode
    gives the posterior's mode, as elsewhere."""
    regularizer = getattr(first_stage, "regularization", None)
    sampling = [(regularizer, "sample")] if getattr(regularizer, "sample", False) is True else []
    with attributes_restored(sampling):
        for owner, name in sampling:
            setattr(owner, name, False)
        yield


def _memory_manager():
    """The Forge-family memory manager (reForge's and Forge Classic's ldm_patched, later Forge's backend), or None."""
    for name in ("ldm_patched.modules.model_management", "backend.memory_management"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "load_models_gpu", None)):
            return module
    return None


@contextlib.contextmanager
def forge_parts_loaded(sd_model, inference: bool = False, networks: bool = False) -> Iterator[None]:
    """On a model a Forge-family backend manages (reForge: the webui's model object over its ModelPatchers): for the
    run, the LoRA-free parts (forge_objects_original: an earlier generation's LoRA is unpatched by the memory manager
    when they load, and the text encoder, which loads its own patcher at every encode, finds no LoRA clone either),
    all three loaded whole on the device, outside inference mode; the model's forge_objects are put back after and
    the next generation loads what it needs. Nothing happens on a model without forge_objects (AUTOMATIC1111).
    ``inference``: load inside inference mode, as the host's own generations do, for weights that already are inference
    tensors (Forge's backend loads every weight so; a move outside inference mode would fail on them). ``networks``:
    the generation's own parts instead, its prompt's LoRAs patched in as its sampler would load them."""
    current = getattr(sd_model, "forge_objects", None)
    manager = _memory_manager() if current is not None else None
    if manager is None:
        yield
        return
    original = current if networks else getattr(sd_model, "forge_objects_original", None) or current
    use = original.shallow_copy() if callable(getattr(original, "shallow_copy", None)) else original
    patchers = [part for part in (getattr(use, "unet", None), getattr(getattr(use, "clip", None), "patcher", None),
                                  getattr(getattr(use, "vae", None), "patcher", None)) if part is not None]
    full = {"force_full_load": True} if "force_full_load" in inspect.signature(manager.load_models_gpu).parameters \
        else {}
    with attributes_restored([(sd_model, "forge_objects")]):
        sd_model.forge_objects = use
        with torch.inference_mode(inference):
            manager.load_models_gpu(patchers, **full)
        yield


@contextlib.contextmanager
def normal_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """Weights that a generation created, moved or LoRA-patched under torch.inference_mode are inference tensors,
    which backward cannot save ("Inference tensors cannot be saved for backward"): for the run, each such Parameter
    or buffer of ``modules`` is replaced by a normal tensor over the same memory (a copy would hold the model twice,
    which an fp32 SDXL does not fit; the weights are frozen, so nothing writes through it), and the original objects
    are put back after, so the host's memory manager and LoRA backups find their own tensors."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    aliases: dict[int, torch.Tensor] = {}
    try:
        for owner in (m for module in modules for m in module.modules()):
            for table in (owner._parameters, owner._buffers):
                for name, tensor in list(table.items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    if id(tensor) not in aliases:  # a tensor several modules share stays shared
                        aliases[id(tensor)] = _normal_alias(tensor)
                    swapped.append((table, name, tensor))
                    table[name] = aliases[id(tensor)]
        yield
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor made outside inference mode over ``tensor``'s storage: the same memory, without the inference flag."""
    with torch.inference_mode(False), torch.no_grad():
        alias = tensor.new_empty(0).set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape,
                                         tensor.stride())
    return torch.nn.Parameter(alias, requires_grad=tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) \
        else alias


def _copied_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args)


@contextlib.contextmanager
def norms_read_copies(unet: torch.nn.Module) -> Iterator[None]:
    """In blocks that add their residual in place onto the x their norm just read (Forge Classic), the norm saves
    that x for backward and the add then changes it ("modified by an inplace operation"): for the run each norm of
    such a block reads a copy of its input instead, by a forward pre-hook removed on exit."""
    norms = [child for block in unet.modules() if host.adds_residuals_in_place(block)
             for name, child in block.named_children() if name.startswith("norm")]
    handles = [norm.register_forward_pre_hook(_copied_inputs) for norm in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# (module, its attention-function globals, the replacement's module and name): ldm_patched (Forge Classic, reForge)
# picks SageAttention when installed; Forge's backend (Neo) binds Sage or a flash kernel at import
ATTENTION_SLOTS = (
    ("ldm_patched.ldm.modules.attention", ("optimized_attention", "optimized_attention_masked"),
     "ldm_patched.ldm.modules.attention", "attention_pytorch"),
    ("backend.nn.unet", ("attention_function",), "backend.attention", "attention_pytorch"),
)
NO_BACKWARD = ("sage", "flash")  # kernels without a backward pass, by function name


@contextlib.contextmanager
def attention_with_backward() -> Iterator[None]:
    """For the run, the UNet's attention through PyTorch's scaled-dot-product attention wherever the host picked a
    kernel without a backward pass (Sage, flash); the host's choice again after."""
    swaps = []
    for module_name, names, source, replacement in ATTENTION_SLOTS:
        module, origin = sys.modules.get(module_name), sys.modules.get(source)
        function = getattr(origin, replacement, None)
        swaps += [(module, name, function) for name in names if function is not None
                  and any(k in getattr(getattr(module, name, None), "__name__", "") for k in NO_BACKWARD)]
    with attributes_restored((module, name) for module, name, _ in swaps):
        for module, name, function in swaps:
            setattr(module, name, function)
        yield


def layers_of(sd_model) -> dict[str, dict[str, torch.nn.Module]]:
    """The adapter layers of a loaded model, by canonical name (ldm's, sgm's, OpenCLIP's and Forge's backend's
    modules mapped)."""
    unet = named_layers(unet_of(sd_model).named_modules(), unet_name)
    text = text_layers(text_encoders(sd_model))
    return {adapters.UNET: adapters.target_layers(unet, adapters.UNET),
            adapters.TEXT: adapters.target_layers(text, adapters.TEXT)}


@contextlib.contextmanager
def float32_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """The modules in float32 for the run (the same Parameter objects, converted in place), back in their own
    dtype afterwards: fp16 and bf16 values survive the round trip bit for bit."""
    tensors = list({id(t): t for module in modules for t in (*module.parameters(), *module.buffers())
                    if t.is_floating_point()}.values())
    dtypes = [t.dtype for t in tensors]
    try:
        for tensor in tensors:
            tensor.data = tensor.data.float()
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes, strict=True):
            tensor.data = tensor.data.to(dtype)


# ldm_patched's (reForge, Forge Classic) and Forge's backend's (Neo) layers that cast their weights at each forward
CAST_FLAGS = ("ldm_patched_cast_weights", "parameters_manual_cast")


def float32_where_cast(*modules: torch.nn.Module):
    """The Forge family keeps its text encoders in fp16, also on a CPU, and each layer casts its weights to the
    float32 stream at every forward. With a gradient, autograd keeps every cast copy until the backward pass: an
    SDXL encode held 3.2 GB of them, and an identity's step makes two. For the run, those layers hold float32 weights
    themselves (the same values: the cast is exact), so the cast is a no-op; ``float32_weights`` puts their dtype
    back after."""
    return float32_weights(*(layer for module in modules for layer in module.modules()
                             if any(getattr(layer, flag, False) is True for flag in CAST_FLAGS)))


CHECKPOINT_FLAGS = ("use_checkpoint", "checkpoint")  # ldm's and sgm's names for a block's checkpointing switch


def _checkpointable(module: torch.nn.Module) -> str | None:
    """The flag of an ldm/sgm block whose forward runs ``_forward`` through their checkpoint(), else None."""
    if not callable(getattr(module, "_forward", None)):
        return None
    return next((flag for flag in CHECKPOINT_FLAGS if isinstance(module.__dict__.get(flag), bool)), None)


@contextlib.contextmanager
def ldm_checkpointing_off(unet: torch.nn.Module) -> Iterator[None]:
    """Set every block's checkpointing flag to False for the run and restore each afterwards."""
    flags = [(m, flag) for m in unet.modules() if (flag := _checkpointable(m))]
    with attributes_restored(flags):
        for module, flag in flags:
            setattr(module, flag, False)
        yield


def _on_a_copy(function, x: torch.Tensor, *args, **kwargs):
    return function(x.clone(), *args, **kwargs)


@contextlib.contextmanager
def checkpointed_blocks(unet: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing without touching any class: each block gets an instance ``forward`` that runs its
    ``_forward`` through torch's non-reentrant checkpoint (fine with frozen weights; the recomputation runs
    with the adapters and row labels of the first pass); removed on exit."""
    blocks = [m for m in unet.modules() if _checkpointable(m) and "forward" not in vars(m)] if enabled else []
    with attributes_restored((block, "forward") for block in blocks):
        for block in blocks:
            run = block._forward
            if host.adds_residuals_in_place(block):  # onto its own input, which the recomputation starts from
                run = functools.partial(_on_a_copy, run)
            block.forward = functools.partial(adapters.checkpoint, run)
        yield
