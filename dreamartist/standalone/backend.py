"""A Stable Diffusion model held as diffusers and transformers modules, behind the Backend protocol (SD 1.x / 2.x
here; SDXL, with its second text encoder and added conditioning, in dreamartist.standalone.sdxl)."""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from dreamartist import adapters
from dreamartist.attributes import attributes_restored
from dreamartist.backend import EPSILON, Conditioning, PatchSlot, WordVectors, checked_words, frozen
from dreamartist.families import FAMILIES
from dreamartist.layer_names import named_layers, text_layers, unet_name
from dreamartist.prompts import WordFinder, chunk_prompt, empty_chunk

PAD_WITH_ZERO = ("clip_h", "clip_g")  # OpenCLIP's encoders pad after the first EOS with token 0; CLIP-L with EOS


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 steps: int = 1000) -> torch.Tensor:
    """SD's 'scaled_linear' schedule (betas linear in sqrt space), in float64 then float32 as ldm and the webui do."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)  # (T,)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move and cast with torch's own ``to``: diffusers' override warns about from_pretrained loads on every cast."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


class StandaloneBackend(PatchSlot):
    """The Backend protocol over a diffusers UNet and VAE and a transformers CLIP text encoder.

    SD1's context is CLIP-L's last hidden state after the final layer norm. SD2's text encoder config keeps
    23 of OpenCLIP-H's 24 layers, so its last hidden state is the webui's penultimate layer (also normed).
    SD2 pads prompts with token 0 as OpenCLIP does, SD1 with EOS. The text encoders are kept per encoder key
    (``text_encoders``) so that a family with several (SDXL) shares every step but the combination.
    """

    PENULTIMATE = False  # True: each encoder's context is its penultimate hidden state, unnormed (SDXL)

    def __init__(self, *, family: str, unet, vae, text_encoder, tokenizer, alphas_cumprod: torch.Tensor,
                 prediction_type: str = EPSILON, model_name: str = "", model_hash: str = "",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 image_size: int | None = None) -> None:
        if family not in ("sd1", "sd2"):
            raise ValueError(f"unknown family {family!r}")
        (self.encoder_key,) = FAMILIES[family].widths  # one text encoder
        self._setup(family, unet, vae, {self.encoder_key: text_encoder}, tokenizer, alphas_cumprod, prediction_type,
                    model_name, model_hash, device, dtype, image_size)

    def _setup(self, family: str, unet, vae, text_encoders: dict, tokenizer, alphas_cumprod: torch.Tensor,
               prediction_type: str, model_name: str, model_hash: str, device, dtype, image_size: int | None = None
               ) -> None:
        """Place the models and read what the protocol exposes; ``text_encoders`` maps encoder key -> model."""
        self.family = family
        self.image_size = image_size or FAMILIES[family].size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
        self.embedding_dims = {key: model.get_input_embeddings().embedding_dim for key, model in text_encoders.items()}
        self.latent_channels = vae.config.latent_channels
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.model_name = model_name
        self.model_hash = model_hash
        self.tokenizer = tokenizer
        # The VAE stays in float32: its fp16 decode overflows on some checkpoints.
        self.unet_model = _place(unet, self.device, self.dtype)
        self.vae_model = _place(vae, self.device, torch.float32)
        self.text_encoders = {key: _place(model, self.device, self.dtype) for key, model in text_encoders.items()}
        self.text_encoder = next(iter(self.text_encoders.values()))  # the first (the only one below SDXL)
        for module in self.modules:
            module.eval().requires_grad_(False)  # nothing here trains model weights; gradients go to word vectors
        self.pad_ids = {key: 0 if key in PAD_WITH_ZERO else tokenizer.eos_token_id for key in self.text_encoders}
        self.special_ids = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, comma=self.token_ids(",")[0])

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return self.unet_model, self.vae_model, *self.text_encoders.values()

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, never truncated."""
        return self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids

    def _token_table(self, key: str) -> torch.Tensor:
        return self.text_encoders[key].get_input_embeddings().weight

    def word_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Raw token embeddings of ``text`` (no BOS/EOS) per encoder: (n_tokens, dim), detached float32 on the CPU."""
        ids = torch.tensor(self.token_ids(text), dtype=torch.long)
        vectors = {}
        for key in self.text_encoders:
            table = self._token_table(key)
            vectors[key] = table.detach()[ids.to(table.device)].float().cpu().reshape(len(ids), table.shape[1])
        return vectors

    def eos_vector(self) -> dict[str, torch.Tensor]:
        """The end-of-text token embedding per encoder: (dim,), detached float32 on the CPU."""
        return {key: self._token_table(key).detach()[self.tokenizer.eos_token_id].float().cpu()
                for key in self.text_encoders}

    def encode(self, prompts: list[str], words: WordVectors | None = None,
               branches: tuple = ()) -> Conditioning:
        """Encode prompts as the webui does (dreamartist.prompts: weights, 75-token chunks, pseudo-words spliced in
        at their slots); differentiable in the pseudo-words' vectors only. Context: (B, 77 x chunks, dim)."""
        if branches and len(branches) != len(prompts):
            raise ValueError(f"{len(branches)} branches for {len(prompts)} prompts")
        vectors = checked_words(words or {}, self.embedding_dims)
        finder = WordFinder({word: next(iter(v.values())).shape[0] for word, v in vectors.items()}, self.token_ids)
        per_prompt = [chunk_prompt(prompt, self.token_ids, finder, **self.special_ids) for prompt in prompts]
        blank = empty_chunk(self.special_ids["bos"], self.special_ids["eos"])
        count = max(len(chunks) for chunks in per_prompt)
        with adapters.row_labels(branches or None):
            per_chunk = [{key: self._encode_chunks(key, [chunks[i] if i < len(chunks) else blank
                                                         for chunks in per_prompt], vectors)
                          for key in self.text_encoders} for i in range(count)]
        return self._conditioning(per_chunk, branches)

    def _conditioning(self, per_chunk: list[dict[str, tuple]], branches: tuple) -> Conditioning:
        """Chunk -> encoder key -> (context, encoder output) as one Conditioning: the encoders' contexts side by
        side (the webui concatenates SDXL's CLIP-L and OpenCLIP-G states so), the chunks one after another."""
        context = torch.cat([torch.cat([z for z, _ in chunk.values()], dim=-1) for chunk in per_chunk], dim=1)
        return Conditioning(context=context, branches=tuple(branches))

    def _encode_chunks(self, key: str, chunks: list, vectors: dict[str, dict[str, torch.Tensor]]) -> tuple:
        """One chunk per prompt through text encoder ``key`` -> ((B, 77, dim), the encoder's output): pseudo-words
        spliced into the token embeddings, then the weights applied with the mean kept, as the webui's "Original"
        emphasis does for each encoder."""
        rows = []
        for chunk in chunks:
            ids = list(chunk.tokens)
            if self.pad_ids[key] != self.special_ids["eos"]:  # OpenCLIP pads after the first EOS with token 0
                end = ids.index(self.special_ids["eos"])
                ids[end + 1:] = [self.pad_ids[key]] * (len(ids) - end - 1)
            rows.append(ids)
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)  # (B, 77)
        encoder = self.text_encoders[key]

        def splice(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()  # a fresh tensor so the in-place writes stay differentiable
            for row, chunk in enumerate(chunks):
                for offset, word in chunk.words:
                    vector = vectors[word][key].to(output.device, output.dtype)  # (n, dim)
                    output[row, offset + 1:offset + 1 + vector.shape[0]] = vector
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            encoded = encoder(input_ids=input_ids, output_hidden_states=self.PENULTIMATE)
        finally:
            handle.remove()
        z = encoded.hidden_states[-2] if self.PENULTIMATE else encoded.last_hidden_state
        if any(weight != 1 for chunk in chunks for weight in chunk.weights):  # decided on the host: no device sync
            weights = torch.tensor([chunk.weights for chunk in chunks], device=z.device, dtype=z.dtype)
            mean = z.mean()
            z = z * weights.unsqueeze(-1)
            z = z * (mean / z.mean())
        return z, encoded

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call returning eps or v (per ``prediction_type``) as float32."""
        if latents.shape[0] != len(cond):
            raise ValueError(f"{latents.shape[0]} latents for {len(cond)} conditioning rows")
        with adapters.row_labels(cond.branches or None):
            output = self.unet_model(latents.to(self.device, self.dtype), timesteps.to(self.device),
                                     encoder_hidden_states=cond.context.to(self.device, self.dtype),
                                     **self._added_inputs(latents, cond)).sample
        return output.float()

    def _added_inputs(self, latents: torch.Tensor, cond: Conditioning) -> dict:
        """Keyword arguments the UNet takes beside the text states (none below SDXL)."""
        return {}

    def controlled_attention(self, controller, calls) -> contextlib.AbstractContextManager:
        """Every attention layer of the UNet under ``controller`` for a with-block (dreamartist.attention_control)."""
        from dreamartist.attention_control import diffusers_control

        return diffusers_control(self.unet_model, controller, calls)

    def adapter_layers(self) -> dict[str, dict[str, torch.nn.Module]]:
        return {adapters.UNET: adapters.target_layers(named_layers(self.unet_model.named_modules(), unet_name),
                                                      adapters.UNET),
                adapters.TEXT: adapters.target_layers(text_layers(self.text_encoders), adapters.TEXT)}

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1,1] -> posterior mean times the scaling factor: (B, 4, H/8, W/8), no gradient."""
        with torch.no_grad():
            posterior = self.vae_model.encode(pixels.to(self.device, torch.float32)).latent_dist
            return posterior.mean * self.vae_model.config.scaling_factor

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels (B, 3, H, W), about [-1,1] and unclamped so gradients pass everywhere."""
        latents = latents.to(self.device, torch.float32) / self.vae_model.config.scaling_factor
        return self.vae_model.decode(latents).sample

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        """Freeze every weight and set gradient checkpointing of the UNet and of the VAE decoder (which eq. 6
        differentiates at full resolution: at SDXL's 1024 px its activations outweigh the UNet's); restore flags,
        modes and settings on exit."""
        models = (self.unet_model, self.vae_model)
        switches = [(m, name) for model in models for m in model.modules() if hasattr(m, "gradient_checkpointing")
                    for name in ("gradient_checkpointing", "_gradient_checkpointing_func")]
        with attributes_restored(switches), frozen(*self.modules):
            for model in models:
                if gradient_checkpointing:
                    model.enable_gradient_checkpointing(**_adapter_aware_checkpointing(model))
                else:
                    model.disable_gradient_checkpointing()
            yield


def _adapter_aware_checkpointing(model: torch.nn.Module) -> dict:
    """diffusers' checkpoint function replaced by one that recomputes with the adapters of the first pass, where
    diffusers takes one (0.33 and later, the minimum pyproject.toml asks for; with an older one, checkpointed
    training with adapters stops in torch's checkpoint, which sees the recomputation save fewer tensors)."""
    if "gradient_checkpointing_func" not in inspect.signature(model.enable_gradient_checkpointing).parameters:
        return {}
    return {"gradient_checkpointing_func": lambda module, *args: adapters.checkpoint(module.__call__, *args)}
