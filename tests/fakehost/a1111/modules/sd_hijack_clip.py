"""modules.sd_hijack_clip: the prompt encoder webui puts around CLIP: 75-token chunks, emphasis, embeddings."""
from __future__ import annotations

import math
from collections import namedtuple

import torch
from modules import devices, prompt_parser, shared

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    """75 tokens (77 with BOS/EOS), their emphasis multipliers, and where embeddings go."""

    def __init__(self):
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[PromptChunkFix] = []


def _emphasis_enabled() -> bool:
    return getattr(shared.opts, "emphasis", "Original") != "None" and shared.opts.enable_emphasis


class FrozenCLIPEmbedderWithCustomWordsBase(torch.nn.Module):
    """Chunking, embedding lookup and emphasis shared by the SD1 and SD2 prompt encoders."""

    id_start = id_end = id_pad = None

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.chunk_length = 75
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(wrapped, "return_pooled", False)
        self.legacy_ucg_val = None  # for sgm's conditioner

    def empty_chunk(self) -> PromptChunk:
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count: int) -> int:
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize_line(self, line: str) -> tuple[list[PromptChunk], int]:
        """Split one prompt into chunks; each embedding found becomes placeholder ids 0 and a fix."""
        parsed = prompt_parser.parse_prompt_attention(line) if _emphasis_enabled() else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0

        def next_chunk() -> None:
            nonlocal token_count, chunk
            token_count += len(chunk.tokens)
            padding = self.chunk_length - len(chunk.tokens)
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * (padding + 1)
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * (padding + 1)
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (_text, weight) in zip(tokenized, parsed, strict=True):
            position = 0
            while position < len(tokens):
                embedding, length_in_tokens = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(tokens[position])
                    chunk.multipliers.append(weight)
                    position += 1
                    if len(chunk.tokens) == self.chunk_length:
                        next_chunk()
                    continue
                vectors = int(embedding.vectors)
                if len(chunk.tokens) + vectors > self.chunk_length:
                    next_chunk()
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * vectors
                chunk.multipliers += [weight] * vectors
                position += length_in_tokens
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks, token_count

    def process_texts(self, texts: list[str]) -> tuple[list[list[PromptChunk]], int]:
        cache: dict[str, tuple] = {}
        batch_chunks, token_count = [], 0
        for line in texts:
            if line not in cache:
                cache[line] = self.tokenize_line(line)
            chunks, count = cache[line]
            token_count = max(count, token_count)
            batch_chunks.append(chunks)
        return batch_chunks, token_count

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch_chunks, _token_count = self.process_texts(texts)
        used_embeddings = {}
        zs = []
        for i in range(max(len(chunks) for chunks in batch_chunks)):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.hijack.fixes = [chunk.fixes for chunk in batch_chunk]
            for fixes in self.hijack.fixes:
                for _offset, embedding in fixes:
                    used_embeddings[embedding.name] = embedding
            zs.append(self.process_tokens([c.tokens for c in batch_chunk], [c.multipliers for c in batch_chunk]))
        if used_embeddings and shared.opts.textual_inversion_add_hashes_to_infotext:
            hashes = [f"{name}: {e.shorthash}" for name, e in used_embeddings.items() if e.shorthash]
            if hashes:
                self.hijack.extra_generation_params["TI hashes"] = ", ".join(hashes)
        if self.return_pooled:  # SDXL's OpenCLIP-G: the first chunk's pooled vector too
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens: list[list[int]], batch_multipliers: list[list[float]]):
        tokens = torch.asarray(remade_batch_tokens).to(devices.device)
        if self.id_end != self.id_pad:  # pad after the first EOS with the encoder's pad id
            for row, row_tokens in enumerate(remade_batch_tokens):
                tokens[row, row_tokens.index(self.id_end) + 1:] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        if _emphasis_enabled():
            multipliers = torch.asarray(batch_multipliers).to(devices.device)
            original_mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            z = z * (original_mean / z.mean())
        if pooled is not None:
            z.pooled = pooled
        return z


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    """SD1: wraps ldm's FrozenCLIPEmbedder (``wrapped.transformer``, ``wrapped.tokenizer``)."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        self.comma_token = self.tokenizer.get_vocab().get(",</w>")
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        skip = shared.opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=skip > 1)
        if skip <= 1:
            return outputs.last_hidden_state
        text_model = getattr(self.wrapped.transformer, "text_model", self.wrapped.transformer)
        return text_model.final_layer_norm(outputs.hidden_states[-skip])

    def encode_embedding_init_text(self, init_text: str, nvpt: int) -> torch.Tensor:
        embedding_layer = self.wrapped.transformer.get_input_embeddings()
        ids = self.tokenizer(init_text, max_length=nvpt, truncation=True, return_tensors="pt",
                             add_special_tokens=False)["input_ids"]
        return embedding_layer.wrapped(ids.to(embedding_layer.wrapped.weight.device)).squeeze(0)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """SDXL's CLIP-L: sgm's FrozenCLIPEmbedder at its ``layer`` ("hidden": hidden_states[layer_idx], no final norm);
    1.10's "Clip skip SDXL" setting counts layers from the end instead."""

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        if getattr(shared.opts, "sdxl_clip_l_skip", False) is True:
            return outputs.hidden_states[-shared.opts.CLIP_stop_at_last_layers]
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]
