"""modules.sd_hijack_open_clip: the SD2 prompt encoder around ldm's FrozenOpenCLIPEmbedder."""
from __future__ import annotations

import torch
from modules import sd_hijack_clip
from modules._variant import FLAGS

from dreamartist.standalone.tokenizer import clip_tokenizer

_tokenizer = None  # open_clip keeps one module-level tokenizer; its ids equal CLIP's


class FrozenOpenCLIPEmbedderWithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    """SD2's OpenCLIP-H (and the base of SDXL's OpenCLIP-G wrapper)."""

    def __init__(self, wrapped, hijack):
        global _tokenizer
        super().__init__(wrapped, hijack)
        _tokenizer = _tokenizer or clip_tokenizer()
        self.comma_token = _tokenizer.get_vocab().get(",</w>")
        self.id_start = _tokenizer.bos_token_id
        self.id_end = _tokenizer.eos_token_id
        self.id_pad = 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.wrapped.encode_with_transformer(tokens)

    def encode_embedding_init_text(self, init_text: str, nvpt: int) -> torch.Tensor:
        weight = self.wrapped.model.token_embedding.wrapped.weight
        ids = torch.tensor([self.tokenize([init_text])[0]], dtype=torch.long, device=weight.device)
        return self.wrapped.model.token_embedding.wrapped(ids).squeeze(0)


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenOpenCLIPEmbedderWithCustomWords):
    """SDXL's OpenCLIP-G: sgm's FrozenOpenCLIPEmbedder2 at its ``layer``, with its pooled vector attached to the
    output as ``z.pooled``."""

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        if FLAGS.pooled_on_saved_state:
            return self._forge_clip_encode(tokens)
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z

    def _forge_clip_encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """modules_forge.forge_clip's CLIP-G: the penultimate hidden state, a tensor the last layer reads and saves
        for backward, carrying the pooled output."""
        model = self.wrapped.model
        x = (model.token_embedding(tokens) + model.positional_embedding).permute(1, 0, 2)
        *blocks, last = model.transformer.resblocks
        for block in blocks:
            x = block(x, attn_mask=model.attn_mask)
        z = x.permute(1, 0, 2).clone()  # (B, 77, width), a tensor of its own as transformers' hidden_states[-2]
        o = model.ln_final(last(z.permute(1, 0, 2), attn_mask=model.attn_mask).permute(1, 0, 2))
        z.pooled = o[torch.arange(o.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
        return z
