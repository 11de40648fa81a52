"""Text encoders as ldm holds them: CLIP (SD1), OpenCLIP-shaped (SD2); SDXL's conditioner is in ldm/sdxl.py."""
from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from dreamartist.standalone.tokenizer import clip_tokenizer

VOCAB = 49408
MAX_LENGTH = 77


def _offset_final_norm(norm: torch.nn.LayerNorm) -> None:
    """A trained CLIP's final norm has a bias, so its output mean is far from 0 (emphasis divides by it)."""
    with torch.no_grad():
        norm.bias.normal_(0.5, 0.1)


class FrozenCLIPEmbedder(torch.nn.Module):
    """ldm FrozenCLIPEmbedder: ``transformer`` (HF CLIPTextModel) and ``tokenizer`` (CLIPTokenizer)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.tokenizer = clip_tokenizer()
        config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=49406,
                                eos_token_id=49407, pad_token_id=49407)
        self.transformer = CLIPTextModel(config)
        _offset_final_norm(self.transformer.get_submodule("final_layer_norm"))
        self.max_length = MAX_LENGTH
        self.layer = "last"

    def forward(self, text):
        ids = self.tokenizer(text, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
        return self.transformer(input_ids=ids["input_ids"]).last_hidden_state


class OpenCLIPTextModel(torch.nn.Module):
    """The parts of an open_clip CLIP model that ldm's FrozenOpenCLIPEmbedder uses."""

    def __init__(self, width: int, layers: int = 2):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(VOCAB, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(MAX_LENGTH, width) * 0.01)
        self.transformer = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True) for _ in range(layers))
        self.ln_final = torch.nn.LayerNorm(width)
        _offset_final_norm(self.ln_final)
        self.register_buffer("attn_mask", torch.full((MAX_LENGTH, MAX_LENGTH), float("-inf")).triu(1), persistent=False)


class FrozenOpenCLIPEmbedder(torch.nn.Module):
    """ldm FrozenOpenCLIPEmbedder (SD2): ``model`` with token_embedding, penultimate layer, no tokenizer attribute."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.model = OpenCLIPTextModel(width)
        self.layer = "penultimate"
        self.layer_idx = 1

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
        for block in self.model.transformer[: len(self.model.transformer) - self.layer_idx]:
            x = block(x, src_mask=self.model.attn_mask)
        return self.model.ln_final(x)

