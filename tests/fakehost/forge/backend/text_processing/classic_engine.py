"""backend.text_processing.classic_engine: the prompt engine that owns a text encoder's embeddings."""
from __future__ import annotations

from collections import namedtuple

import torch
from backend.args import dynamic_args
from backend.text_processing.textual_inversion import EmbeddingDatabase

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    """Forge's token table wrapper: splices each prompt's embeddings (``vec``) in with torch.cat."""

    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped, self.embeddings, self.textual_inversion_key = wrapped, embeddings, textual_inversion_key
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                emb = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = emb.to(inputs_embeds)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]])
            vecs.append(tensor)
        return torch.stack(vecs)


class OriginalEmphasis:
    """backend.text_processing.emphasis's "Original": each token's state times its weight, the mean kept."""

    name = "Original"

    def after_transformers(self):
        original_mean = self.z.mean()
        self.z = self.z * self.multipliers.unsqueeze(-1)
        self.z = self.z * (original_mean / self.z.mean())


class ClassicTextProcessingEngine:
    def __init__(self, text_encoder, tokenizer, chunk_length=75, embedding_dir=None, embedding_key="clip_l",
                 embedding_expected_shape=768, return_pooled=False, clip_skip=1, minimal_clip_skip=1,
                 final_layer_norm=True, **kwargs):
        self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
        if text_encoder is not None:  # Forge swaps its token table for the splicing wrapper
            table = text_encoder.transformer.get_input_embeddings()
            text_encoder.transformer.set_input_embeddings(
                CLIPEmbeddingForTextualInversion(table, self.embeddings, textual_inversion_key=embedding_key))
        if isinstance(embedding_dir, str):  # Forge reads the folder once, here, when the model is built
            self.embeddings.add_embedding_dir(embedding_dir)
            self.embeddings.load_textual_inversion_embeddings()
        self.emphasis = OriginalEmphasis()
        self.embedding_key, self.return_pooled = embedding_key, return_pooled
        self.clip_skip, self.final_layer_norm = max(clip_skip, minimal_clip_skip), final_layer_norm
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.chunk_length = chunk_length

    def tokenize_line(self, line: str):
        """Chunks of 75 tokens with the embeddings found at their positions (the same rules as A1111's prompt
        encoder; the stand-in skips BREAK and comma backtracking)."""
        from modules import prompt_parser

        parsed = prompt_parser.parse_prompt_attention(line)
        tokenized = self.tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)
        chunks, chunk = [], PromptChunk()

        def next_chunk() -> None:
            nonlocal chunk
            padding = self.chunk_length - len(chunk.tokens)
            chunk.tokens = [self.tokenizer.bos_token_id] + chunk.tokens + [self.tokenizer.eos_token_id] * (padding + 1)
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * (padding + 1)
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (_text, weight) in zip(tokenized["input_ids"], parsed, strict=True):
            position = 0
            while position < len(tokens):
                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()
                embedding, length = self.embeddings.find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(tokens[position])
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                if len(chunk.tokens) + embedding.vectors > self.chunk_length:
                    next_chunk()
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * embedding.vectors
                chunk.multipliers += [weight] * embedding.vectors
                position += length
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks, 0

    def process_texts(self, texts):
        return [self.tokenize_line(text)[0] for text in texts], 0

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def empty_chunk(self) -> PromptChunk:
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def encode_with_transformers(self, tokens):
        """The hidden state clip skip picks (through the final norm where the engine has one); SDXL's CLIP-G hangs
        its projected pooled output on it, a state the next layer saved for backward."""
        transformer = self.text_encoder.transformer
        out = transformer(tokens, output_hidden_states=True)
        z = out.hidden_states[-self.clip_skip]
        if self.final_layer_norm:
            z = next(m for name, m in transformer.named_modules() if name.endswith("final_layer_norm"))(z)
        if self.return_pooled:
            z.pooled = out.text_embeds
        return z

    def process_tokens(self, tokens, multipliers):
        """The encoded states weighted by the engine's emphasis object, which keeps them (``emphasis.z``) until the
        next call makes another; the pooled output carried over."""
        z = self.encode_with_transformers(torch.asarray(tokens))
        pooled = getattr(z, "pooled", None)
        self.emphasis.multipliers = torch.asarray(multipliers).to(z)
        self.emphasis.z = z
        self.emphasis.after_transformers()
        z = self.emphasis.z
        if pooled is not None:
            z.pooled = pooled
        return z

    def __call__(self, texts):
        """Neo's engine call: every chunk of every prompt encoded, the embeddings used printed and noted as "TI" for
        the next generation's parameters (appended to what an earlier encode noted)."""
        self.emphasis = OriginalEmphasis()
        batch_chunks, _ = self.process_texts(texts)
        used, zs = {}, []
        for i in range(max(len(chunks) for chunks in batch_chunks)):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.embeddings.fixes = [x.fixes for x in batch_chunk]
            used.update({embedding.name: embedding for fixes in self.embeddings.fixes for _, embedding in fixes})
            zs.append(self.process_tokens([x.tokens for x in batch_chunk], [x.multipliers for x in batch_chunk]))
        if used:
            for name in used:
                print(f"[Textual Inversion] Used Embedding [{name}] in CLIP of [{self.embedding_key}]")
            notes = dynamic_args.last_extra_generation_params
            notes["TI"] = ", ".join([notes["TI"], *used] if "TI" in notes else used)
        return (torch.hstack(zs), zs[0].pooled) if self.return_pooled else torch.hstack(zs)
