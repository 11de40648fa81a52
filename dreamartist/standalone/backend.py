"""A Stable Diffusion 1.x / 2.x model held as diffusers and transformers modules, behind the Backend protocol."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dreamartist import adapters
from dreamartist.backend import EPSILON, Conditioning, PatchSlot, WordVectors, frozen
from dreamartist.errors import InputError
from dreamartist.families import FAMILIES
from dreamartist.layer_names import named_layers, text_name, unet_name
from dreamartist.prompts import WordFinder, chunk_prompt, empty_chunk

_MISSING = object()


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
    SD2 pads prompts with token 0 as OpenCLIP does, SD1 with EOS.
    """

    def __init__(self, *, family: str, unet, vae, text_encoder, tokenizer, alphas_cumprod: torch.Tensor,
                 prediction_type: str = EPSILON, model_name: str = "", model_hash: str = "",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if family not in ("sd1", "sd2"):
            raise ValueError(f"unknown family {family!r}")
        self.family = family
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
        (self.encoder_key,) = FAMILIES[family].widths  # one text encoder
        self.embedding_dims = {self.encoder_key: text_encoder.get_input_embeddings().embedding_dim}
        self.latent_channels = vae.config.latent_channels
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.model_name = model_name
        self.model_hash = model_hash
        self.tokenizer = tokenizer
        # The VAE stays in float32: its fp16 decode overflows on some checkpoints.
        self.unet_model = _place(unet, self.device, self.dtype)
        self.vae_model = _place(vae, self.device, torch.float32)
        self.text_encoder = _place(text_encoder, self.device, self.dtype)
        for module in (self.unet_model, self.vae_model, self.text_encoder):
            module.eval().requires_grad_(False)  # nothing here trains model weights; gradients go to word vectors
        self.pad_id = 0 if family == "sd2" else tokenizer.eos_token_id
        self.special_ids = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, comma=self.token_ids(",")[0])

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return self.unet_model, self.vae_model, self.text_encoder

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, never truncated."""
        return self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids

    def _token_table(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight

    def word_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Raw token embeddings of ``text`` (no BOS/EOS): (n_tokens, dim), detached float32 on the CPU."""
        ids = torch.tensor(self.token_ids(text), dtype=torch.long)
        table = self._token_table()
        rows = table.detach()[ids.to(table.device)].float().cpu()
        return {self.encoder_key: rows.reshape(len(ids), table.shape[1])}

    def eos_vector(self) -> dict[str, torch.Tensor]:
        """The end-of-text token embedding: (dim,), detached float32 on the CPU."""
        return {self.encoder_key: self._token_table().detach()[self.tokenizer.eos_token_id].float().cpu()}

    def _vectors_of(self, words: WordVectors) -> dict[str, torch.Tensor]:
        vectors = {}
        for word, per_encoder in words.items():
            if self.encoder_key not in per_encoder:
                raise InputError(f"The embedding '{word}' has no vectors for this model's text encoder "
                                 f"({self.encoder_key}).")
            vector = per_encoder[self.encoder_key]
            if vector.ndim != 2 or vector.shape[1] != self.embedding_dims[self.encoder_key]:
                raise InputError(f"The embedding '{word}' has vectors of shape {tuple(vector.shape)}, "
                                 f"but this model needs (n, {self.embedding_dims[self.encoder_key]}).")
            vectors[word] = vector
        return vectors

    def encode(self, prompts: list[str], words: WordVectors | None = None,
               branches: tuple = ()) -> Conditioning:
        """Encode prompts as the webui does (dreamartist.prompts: weights, 75-token chunks, pseudo-words spliced in
        at their slots); differentiable in the pseudo-words' vectors only. Context: (B, 77 x chunks, dim)."""
        if branches and len(branches) != len(prompts):
            raise ValueError(f"{len(branches)} branches for {len(prompts)} prompts")
        vectors = self._vectors_of(words or {})
        finder = WordFinder({word: vector.shape[0] for word, vector in vectors.items()}, self.token_ids)
        per_prompt = [chunk_prompt(prompt, self.token_ids, finder, **self.special_ids) for prompt in prompts]
        blank = empty_chunk(self.special_ids["bos"], self.special_ids["eos"])
        count = max(len(chunks) for chunks in per_prompt)
        with adapters.row_labels(branches or None):
            context = torch.cat([self._encode_chunks([chunks[i] if i < len(chunks) else blank
                                                      for chunks in per_prompt], vectors) for i in range(count)], dim=1)
        return Conditioning(context=context, branches=tuple(branches))

    def _encode_chunks(self, chunks: list, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One chunk per prompt -> (B, 77, dim): pseudo-words spliced into the token embeddings, then the weights
        applied with the mean kept, as the webui's "Original" emphasis does."""
        rows = []
        for chunk in chunks:
            ids = list(chunk.tokens)
            if self.pad_id != self.special_ids["eos"]:  # SD2 pads after the first EOS with token 0
                end = ids.index(self.special_ids["eos"])
                ids[end + 1:] = [self.pad_id] * (len(ids) - end - 1)
            rows.append(ids)
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)  # (B, 77)

        def splice(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()  # a fresh tensor so the in-place writes stay differentiable
            for row, chunk in enumerate(chunks):
                for offset, word in chunk.words:
                    vector = vectors[word].to(output.device, output.dtype)  # (n, dim)
                    output[row, offset + 1:offset + 1 + vector.shape[0]] = vector
            return output

        handle = self.text_encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            z = self.text_encoder(input_ids=input_ids).last_hidden_state
        finally:
            handle.remove()
        weights = torch.tensor([chunk.weights for chunk in chunks], device=z.device, dtype=z.dtype)
        if bool((weights != 1).any()):
            mean = z.mean()
            z = z * weights.unsqueeze(-1)
            z = z * (mean / z.mean())
        return z

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One UNet call returning eps or v (per ``prediction_type``) as float32."""
        if latents.shape[0] != len(cond):
            raise ValueError(f"{latents.shape[0]} latents for {len(cond)} conditioning rows")
        with adapters.row_labels(cond.branches or None):
            output = self.unet_model(latents.to(self.device, self.dtype), timesteps.to(self.device),
                                     encoder_hidden_states=cond.context.to(self.device, self.dtype)).sample
        return output.float()

    def adapter_layers(self) -> dict[str, dict[str, torch.nn.Module]]:
        return {adapters.UNET: adapters.target_layers(named_layers(self.unet_model.named_modules(), unet_name),
                                                      adapters.UNET),
                adapters.TEXT: adapters.target_layers(named_layers(self.text_encoder.named_modules(), text_name),
                                                      adapters.TEXT)}

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
        """Freeze every weight and set UNet gradient checkpointing; restore flags, modes and settings on exit."""
        switches = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func", _MISSING))
                    for m in self.unet_model.modules() if hasattr(m, "gradient_checkpointing")]
        try:
            with frozen(*self.modules):
                if gradient_checkpointing:
                    self.unet_model.enable_gradient_checkpointing()
                else:
                    self.unet_model.disable_gradient_checkpointing()
                yield
        finally:
            for module, enabled, function in switches:
                module.gradient_checkpointing = enabled
                if function is _MISSING:
                    module.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    module._gradient_checkpointing_func = function
