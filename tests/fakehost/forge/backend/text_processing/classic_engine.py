"""backend.text_processing.classic_engine: the prompt engine that owns a text encoder's embeddings."""
from __future__ import annotations

from backend.text_processing.textual_inversion import EmbeddingDatabase


class ClassicTextProcessingEngine:
    def __init__(self, tokenizer, embedding_dir: str, embedding_key: str = "clip_l",
                 embedding_expected_shape: int = 768):
        self.tokenizer = tokenizer
        self.embedding_key = embedding_key
        self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)
        self.embeddings.embedding_dir = embedding_dir
