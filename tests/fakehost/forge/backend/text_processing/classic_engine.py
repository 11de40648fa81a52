"""backend.text_processing.classic_engine: the prompt engine that owns a text encoder's embeddings."""
from __future__ import annotations

from collections import namedtuple

from backend.text_processing.textual_inversion import EmbeddingDatabase

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


class ClassicTextProcessingEngine:
    def __init__(self, text_encoder, tokenizer, chunk_length=75, embedding_dir=None, embedding_key="clip_l",
                 embedding_expected_shape=768, **kwargs):
        self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)
        if isinstance(embedding_dir, str):  # Forge reads the folder once, here, when the model is built
            self.embeddings.add_embedding_dir(embedding_dir)
            self.embeddings.load_textual_inversion_embeddings()
        self.embedding_key = embedding_key
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
