"""sgm-shaped SDXL, as the webui's repositories/generative-models builds it from sd_xl_base.yaml, at toy size.

DiffusionEngine: ``conditioner`` (GeneralConditioner: FrozenCLIPEmbedder (CLIP-L, layer "hidden" at the
penultimate index), FrozenOpenCLIPEmbedder2 (an open_clip-shaped bigG text tower: resblocks with a fused q/k/v
MultiheadAttention, penultimate layer, pooled through ``text_projection``), three ConcatTimestepEmbedderND for the
original size, crop and target size), ``model`` (OpenAIWrapper: ``diffusion_model(x, timesteps, context=crossattn,
y=vector)``), ``first_stage_model`` (AutoencoderKLInferenceWrapper: ``encode`` samples the posterior) and
``scale_factor`` 0.13025. The weights are those of tests/tiny_sdxl.parts, moved into these shapes, so that the
standalone SDXL backend can be compared with the webui path on identical weights. "sdxl-refiner" holds OpenCLIP-G
alone plus an aesthetic-score embedder; "sdxl-inpainting" a UNet with 9 input channels.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import tiny_sdxl
import torch
from diffusers import UNet2DConditionModel
from modules._variant import FLAGS
from torch import nn

from dreamartist.standalone.tokenizer import clip_tokenizer

from .models import UNetModel, _freeze

MAX_LENGTH = 77


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """sgm's sinusoidal embedding: cosines then sines of t * exp(-ln(max_period) i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AbstractEmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.is_trainable, self.ucg_rate, self.input_key, self.legacy_ucg_val = False, 0.0, None, None


class FrozenCLIPEmbedder(AbstractEmbModel):
    """sgm FrozenCLIPEmbedder: ``transformer`` (HF CLIPTextModel), ``tokenizer``, ``layer``, ``layer_idx``."""

    def __init__(self, transformer, layer: str = "hidden", layer_idx: int | None = None):
        super().__init__()
        self.tokenizer = clip_tokenizer()
        self.transformer = transformer
        self.max_length = MAX_LENGTH
        self.layer, self.layer_idx = layer, layer_idx
        self.return_pooled = False

    def forward(self, text):
        ids = self.tokenizer(list(text), truncation=True, max_length=MAX_LENGTH, padding="max_length",
                             return_tensors="pt")["input_ids"]
        outputs = self.transformer(input_ids=ids, output_hidden_states=self.layer == "hidden")
        return outputs.last_hidden_state if self.layer == "last" else outputs.hidden_states[self.layer_idx]


class ResidualAttentionBlock(nn.Module):
    """open_clip's text block: pre-norm attention (q/k/v fused) and MLP (c_fc, GELU, c_proj), sequence first."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(nn.Module):
    """The parts of an open_clip CLIP model that sgm uses for text (the visual tower is deleted there)."""

    def __init__(self, hf_model):
        super().__init__()
        config = hf_model.config
        width, heads, hidden = config.hidden_size, config.num_attention_heads, config.intermediate_size
        state = {k.removeprefix("text_model."): v for k, v in hf_model.state_dict().items()}
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(state["embeddings.position_embedding.weight"].clone())
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, hidden)
                                                   for _ in range(config.num_hidden_layers))
        self.transformer.grad_checkpointing = False
        self.ln_final = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(state["text_projection.weight"].T.clone())
        self.register_buffer("attn_mask", torch.full((MAX_LENGTH, MAX_LENGTH), float("-inf")).triu(1),
                             persistent=False)
        with torch.no_grad():
            self.token_embedding.weight.copy_(state["embeddings.token_embedding.weight"])
            self.ln_final.weight.copy_(state["final_layer_norm.weight"])
            self.ln_final.bias.copy_(state["final_layer_norm.bias"])
            for i, block in enumerate(self.transformer.resblocks):
                hf = f"encoder.layers.{i}."
                for part in ("weight", "bias"):
                    fused = torch.cat([state[f"{hf}self_attn.{p}_proj.{part}"] for p in "qkv"])
                    getattr(block.attn, f"in_proj_{part}").copy_(fused)
                    getattr(block.attn.out_proj, part).copy_(state[f"{hf}self_attn.out_proj.{part}"])
                    getattr(block.ln_1, part).copy_(state[f"{hf}layer_norm1.{part}"])
                    getattr(block.ln_2, part).copy_(state[f"{hf}layer_norm2.{part}"])
                    getattr(block.mlp.c_fc, part).copy_(state[f"{hf}mlp.fc1.{part}"])
                    getattr(block.mlp.c_proj, part).copy_(state[f"{hf}mlp.fc2.{part}"])


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    """sgm FrozenOpenCLIPEmbedder2 (legacy False): ``encode_with_transformer`` returns {"penultimate", "last",
    "pooled"}; the pooled vector is ln_final(last) at the EOT token (the highest id) @ text_projection."""

    def __init__(self, model: OpenCLIPText, layer: str = "penultimate", always_return_pooled: bool = True):
        super().__init__()
        self.model = model
        self.max_length = MAX_LENGTH
        self.return_pooled = always_return_pooled
        self.layer, self.layer_idx = layer, {"last": 0, "penultimate": 1}[layer]
        self.legacy = False
        self._tokenizer = clip_tokenizer()

    def forward(self, text):
        rows = [self._tokenizer(t, add_special_tokens=True, truncation=True, max_length=MAX_LENGTH)["input_ids"]
                for t in text]
        tokens = torch.tensor([row + [0] * (MAX_LENGTH - len(row)) for row in rows])  # open_clip.tokenize
        z = self.encode_with_transformer(tokens)
        return (z[self.layer], z["pooled"]) if self.return_pooled else z[self.layer]

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        outputs = {}
        for i, block in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        o = self.model.ln_final(outputs["last"])
        outputs["pooled"] = o[torch.arange(o.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection
        return outputs


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """Embeds each number of a (B, d) input with 2 x ``outdim`` / 2 sinusoidal features; (B, d * outdim)."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        x = x[:, None] if x.ndim == 1 else x
        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm GeneralConditioner.forward: each embedder on its input key (under no_grad unless trainable), outputs
    sorted by rank into "crossattn" (concatenated on the feature axis) and "vector" (on axis 1)."""

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders: list[tuple[str, AbstractEmbModel]]):
        super().__init__()
        for key, embedder in embedders:
            embedder.input_key = key
            _freeze(embedder)
        self.embedders = nn.ModuleList(embedder for _, embedder in embedders)

    def forward(self, batch: dict, force_zero_embeddings: list | None = None) -> dict:
        output = {}
        for embedder in self.embedders:
            context = contextlib.nullcontext if embedder.is_trainable else torch.no_grad
            with context():
                emb_out = embedder(batch[embedder.input_key])
            for emb in emb_out if isinstance(emb_out, (list, tuple)) else [emb_out]:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.ucg_rate > 0.0:
                    raise AssertionError("the webui sets ucg_rate to 0 before conditioning")
                if embedder.input_key in (force_zero_embeddings or []):
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)


class AutoencoderKLInferenceWrapper(nn.Module):
    """sgm's first stage: encoder, quant_conv, decoder, post_quant_conv (diffusers uses the same names); ``encode``
    SAMPLES the posterior, ``decode`` is undecorated."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv

    def encode(self, x):
        assert not self.training, "AutoencoderKL only supports inference"
        return DiagonalGaussian(self.quant_conv(self.encoder(x))).sample()

    def decode(self, z, **kwargs):
        return self.decoder(self.post_quant_conv(z))


class EpsScaling:
    pass


class VScaling:
    pass


class DiffusionEngine(nn.Module):
    """sgm DiffusionEngine: the webui's sd_models_xl adds get_learned_conditioning, apply_model and the rest."""

    def __init__(self, conditioner: GeneralConditioner, unet: nn.Module, vae, v_prediction: bool = False):
        super().__init__()
        self.conditioner = conditioner
        self.model = OpenAIWrapper(unet)
        self.first_stage_model = AutoencoderKLInferenceWrapper(vae)
        _freeze(self.first_stage_model)
        self.denoiser = nn.Module()
        self.denoiser.scaling = VScaling() if v_prediction else EpsScaling()
        self.scale_factor = 0.13025
        self.disable_first_stage_autocast = True

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield


def sgm_unet(unet: UNet2DConditionModel, in_channels: int = 4) -> UNetModel:
    """The diffusers UNet as sgm's UNetModel: ``label_emb`` (y, the conditioner's "vector") added to the time
    embedding; diffusers' text_time embedding is the same two Linear layers on the same vector."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config.update(addition_embed_type=None, class_embed_type="projection", in_channels=in_channels)
    shaped = UNet2DConditionModel(**config)
    state = {key.replace("add_embedding.", "class_embedding."): value for key, value in unet.state_dict().items()}
    if in_channels != unet.config.in_channels:
        state = {k: v for k, v in state.items() if not k.startswith("conv_in.")}
    shaped.load_state_dict(state, strict=in_channels == unet.config.in_channels)
    # 1.6.0 builds SDXL with sd_xl_base.yaml's use_checkpoint: True; 1.7+ switch it off.
    return UNetModel(context_dim=unet.config.cross_attention_dim, unet=shaped, use_checkpoint=FLAGS.unet_use_checkpoint)


def build(kind: str = "sdxl", seed: int = 0) -> DiffusionEngine:
    """A seeded SDXL of ``kind`` ("sdxl", "sdxl-vpred", "sdxl-refiner", "sdxl-inpainting") over tiny_sdxl.parts."""
    parts = tiny_sdxl.parts(seed)
    size_embedders = [(key, ConcatTimestepEmbedderND(tiny_sdxl.TIME_WIDTH))
                      for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    clip_g = FrozenOpenCLIPEmbedder2(OpenCLIPText(parts["text_encoder_2"]))
    if kind == "sdxl-refiner":
        embedders = [("txt", clip_g), *size_embedders, ("aesthetic_score", ConcatTimestepEmbedderND(8))]
    else:
        clip_l = FrozenCLIPEmbedder(parts["text_encoder"], layer="hidden",
                                    layer_idx=tiny_sdxl.CLIP_L["num_hidden_layers"] - 1)
        embedders = [("txt", clip_l), ("txt", clip_g), *size_embedders]
    unet = sgm_unet(parts["unet"], in_channels=9 if kind == "sdxl-inpainting" else 4)
    return DiffusionEngine(GeneralConditioner(embedders), unet, parts["vae"], v_prediction=kind == "sdxl-vpred")
