"""One name per adapter layer, whatever library built the model: the diffusers module path, as kohya's LoRA
files spell it (with "." for "_").

UNet: ldm's ``input_blocks.{i}.1`` is diffusers' ``down_blocks.{(i-1)//3}.attentions.{(i-1)%3}``,
``middle_block.1`` is ``mid_block.attentions.0`` and ``output_blocks.{i}.1`` is
``up_blocks.{i//3}.attentions.{i%3}``; inside a transformer block both use the same names (attn1.to_k, ff.net.2).
Text encoder: transformers' CLIP (``text_model.`` is absent from version 5 on); OpenCLIP's
``resblocks.{n}.attn.out_proj`` / ``mlp.c_fc`` / ``mlp.c_proj`` are ``layers.{n}.self_attn.out_proj`` /
``mlp.fc1`` / ``mlp.fc2`` (its q, k, v live in one fused matrix, so they carry no adapter). A model with two text
encoders (SDXL) prefixes each encoder's names with its key: "clip_l.text_model...", "clip_g.text_model...".
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

_DIFFUSERS_UNET = re.compile(r"(?:^|\.)((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
                             r"\.(transformer_blocks\.\d+\..+)$")
_LDM_UNET = re.compile(r"(?:^|\.)(input_blocks|output_blocks)\.(\d+)\.1\.(transformer_blocks\.\d+\..+)$")
_LDM_MID = re.compile(r"(?:^|\.)middle_block\.1\.(transformer_blocks\.\d+\..+)$")
_HF_TEXT = re.compile(r"(?:^|\.)encoder\.(layers\.\d+\..+)$")
_OPENCLIP_TEXT = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_OPENCLIP_PARTS = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def unet_name(path: str) -> str | None:
    """The canonical name of a UNet module path (ldm or diffusers), None outside the transformer blocks."""
    match = _DIFFUSERS_UNET.search(path)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    match = _LDM_UNET.search(path)
    if match:
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        block, attention = ((index - 1) // 3, (index - 1) % 3) if kind == "input_blocks" else divmod(index, 3)
        prefix = "down_blocks" if kind == "input_blocks" else "up_blocks"
        return f"{prefix}.{block}.attentions.{attention}.{rest}"
    match = _LDM_MID.search(path)
    return f"mid_block.attentions.0.{match.group(1)}" if match else None


def text_name(path: str) -> str | None:
    """The canonical name of a text-encoder module path (transformers or OpenCLIP), None outside its layers."""
    match = _HF_TEXT.search(path)
    if match:
        return f"text_model.encoder.{match.group(1)}"
    match = _OPENCLIP_TEXT.search(path)
    if match:
        return f"text_model.encoder.layers.{match.group(1)}.{_OPENCLIP_PARTS[match.group(2)]}"
    return None


def named_layers(modules: Iterable[tuple[str, torch.nn.Module]], canonical) -> dict[str, torch.nn.Module]:
    """canonical name -> module for the modules ``canonical`` names (the first module of each name wins)."""
    named: dict[str, torch.nn.Module] = {}
    for path, module in modules:
        name = canonical(path)
        if name is not None:
            named.setdefault(name, module)
    return named


def text_layers(encoders: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """canonical name -> module over every text encoder (encoder key -> module); prefixed by the key when there
    are several, so that SDXL's two encoders, whose layers share their names, stay apart."""
    named: dict[str, torch.nn.Module] = {}
    for key, encoder in encoders.items():
        prefix = f"{key}." if len(encoders) > 1 else ""
        named |= {prefix + name: module for name, module in named_layers(encoder.named_modules(), text_name).items()}
    return named
