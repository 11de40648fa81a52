"""modules.sd_hijack: model_hijack (embedding_db, fixes), EmbeddingsWithFixes, attention optimisations."""
from __future__ import annotations

import torch
from modules import devices, errors, script_callbacks, sd_hijack_optimizations, shared
from modules._variant import FLAGS
from modules.textual_inversion import textual_inversion


class EmbeddingsWithFixes(torch.nn.Module):
    """The token embedding with textual-inversion vectors spliced in after BOS at each fix's offset."""

    def __init__(self, wrapped: torch.nn.Embedding, embeddings, textual_inversion_key: str = "clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(fixes) for fixes in batch_fixes) == 0:
            return inputs_embeds
        rows = []
        for fixes, row in zip(batch_fixes, inputs_embeds, strict=True):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = devices.cond_cast_unet(vec)
                if FLAGS.embeddings_cast_to_input:
                    emb = emb.to(inputs_embeds.dtype)
                n = min(row.shape[0] - offset - 1, emb.shape[0])
                row = torch.cat([row[0:offset + 1], emb[0:n], row[offset + 1 + n:]])
            rows.append(row)
        return torch.stack(rows)


def list_optimizers() -> list:
    found = [sd_hijack_optimizations.SdOptimizationSdp(), sd_hijack_optimizations.SdOptimizationDoggettx()]
    found += script_callbacks.list_optimizers_callback()
    return sorted((o for o in found if o.is_available()), key=lambda o: o.priority, reverse=True)


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params: dict = {}
        self.comments: list = []
        self.embedding_db = textual_inversion.EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)

    def apply_optimizations(self, option=None):
        if not FLAGS.hijack_optimizations:  # reForge: a method that does nothing
            return
        try:
            self.optimization_method = apply_optimizations(option)
        except Exception:
            errors.report("Error applying cross attention optimization", exc_info=True)
            undo_optimizations()

    def hijack(self, m) -> None:
        from ldm.encoders import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
        from modules import sd_hijack_clip, sd_hijack_open_clip

        conditioner = getattr(m, "conditioner", None)
        if conditioner is not None:  # SDXL: each text embedder wrapped by its type name, as the webui does
            text_cond_models = []
            for i, embedder in enumerate(conditioner.embedders):
                typename = type(embedder).__name__
                if typename == "FrozenCLIPEmbedder":
                    encoder = embedder.transformer
                    encoder.set_input_embeddings(EmbeddingsWithFixes(encoder.get_input_embeddings(), self))
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
                if typename == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self,
                                                                         textual_inversion_key="clip_g")
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder,
                                                                                                         self)
                    text_cond_models.append(conditioner.embedders[i])
            m.cond_stage_model = text_cond_models[0] if len(text_cond_models) == 1 else conditioner
        elif isinstance(m.cond_stage_model, FrozenCLIPEmbedder):
            encoder = m.cond_stage_model.transformer
            encoder.set_input_embeddings(EmbeddingsWithFixes(encoder.get_input_embeddings(), self))
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        elif isinstance(m.cond_stage_model, FrozenOpenCLIPEmbedder):
            clip_model = m.cond_stage_model.model
            clip_model.token_embedding = EmbeddingsWithFixes(clip_model.token_embedding, self)
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.apply_optimizations()
        self.clip = m.cond_stage_model

    def undo_hijack(self, m) -> None:
        conditioner = getattr(m, "conditioner", None)
        wrapped = getattr(m.cond_stage_model, "wrapped", None)
        if conditioner is not None:
            from modules import sd_hijack_clip, sd_hijack_open_clip

            for i, embedder in enumerate(conditioner.embedders):
                if isinstance(embedder, sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords):
                    embedder.wrapped.model.token_embedding = embedder.wrapped.model.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
                if isinstance(embedder, sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords):
                    transformer = embedder.wrapped.transformer
                    transformer.set_input_embeddings(transformer.get_input_embeddings().wrapped)
                    conditioner.embedders[i] = embedder.wrapped
            del m.cond_stage_model
        elif hasattr(wrapped, "transformer"):
            wrapped.transformer.set_input_embeddings(wrapped.transformer.get_input_embeddings().wrapped)
            m.cond_stage_model = wrapped
        elif hasattr(wrapped, "model"):
            wrapped.model.token_embedding = wrapped.model.token_embedding.wrapped
            m.cond_stage_model = wrapped
        if FLAGS.hijack_optimizations:
            undo_optimizations()
        self.clip = None

    def clear_comments(self) -> None:
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()


def apply_optimizations(option=None) -> str:
    """Swap in the chosen optimisation (``option``, else the setting; "Automatic": the first available) and
    return its name, "" for none. Only model_hijack.apply_optimizations records the name."""
    undo_optimizations()
    optimizers = list_optimizers()
    selection = option or shared.opts.cross_attention_optimization
    if not optimizers or selection == "None":
        return ""
    choice = next((o for o in optimizers if o.title() == selection), optimizers[0])
    choice.apply()
    return choice.name


def undo_optimizations() -> None:
    """Put the plain attention back; model_hijack.optimization_method keeps its value."""
    sd_hijack_optimizations.SdOptimization().undo()


if not FLAGS.hijack_optimizations:  # reForge removed the module-level functions (its Train tab still calls them)
    del apply_optimizations, undo_optimizations
