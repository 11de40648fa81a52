"""backend.text_processing.classic_engine: the prompt engine that owns a text encoder's embeddings."""
from __future__ import annotations

from backend.text_processing.textual_inversion import EmbeddingDatabase


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
