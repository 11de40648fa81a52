"""reForge on the stand-in host: the webui's model object over ldm_patched's ModelPatchers, loaded (LoRA patched in)
at each generation inside torch.inference_mode, a hijack without module-level optimisation functions, and a VAE
encode that returns scaled latents. Each test reproduces what the real reForge (tests/real_webui) showed, or what its
source says a GPU does (tests/fakehost/reforge)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fakehost.checks import assert_same_state, model_state
from tabhelpers import load_extension

from dreamartist import pairfiles
from dreamartist.config import TrainConfig


def config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(name="walle", steps=2, width=64, height=64, init_words="robot"), **changes})


def generate(host, prompt="a photo of a cat", **fields):
    p = host.txt2img(prompt=prompt, seed=1234, **fields)
    processed = host.process_images(p)
    return np.asarray(processed.images[0]), processed


def lora_patch(model) -> dict:
    """A LoRA as reForge's Lora extension applies it: a clone of the UNet patcher with weight deltas."""
    unet = model.forge_objects_original.unet
    key, weight = next((k, w) for k, w in unet.model.named_parameters() if "to_q" in k)
    return {key: torch.full_like(weight, 0.05)}


def test_reforge_host_keeps_the_webui_model_and_hijack(host_reforge):
    from modules import sd_hijack

    from extensions_builtin_compat import host as probes

    model = host_reforge.load_model("sd1")
    assert probes.is_forge() and probes.has_embedding_db() and not hasattr(sd_hijack, "undo_optimizations")
    assert model.forge_objects.unet.model.diffusion_model is model.model.diffusion_model
    assert probes.host_unsupported_reason() is None and probes.training_unavailable_reason() is None


def test_trains_after_a_generation_left_inference_weights_and_puts_them_back(host_reforge, references):
    """The real reForge: "'torch.return_types.mode' object has no attribute 'float'" (its encode_first_stage returns
    the latents as a tensor); and with the defaults the hijack's undo_optimizations, which reForge removed, would
    be called. On a GPU a generation leaves inference tensors in the loaded parts (the stand-in models the move)."""
    from ldm_patched.modules import model_management

    from extensions_builtin_compat import jobs

    load_extension(host_reforge)
    model = host_reforge.load_model("sd1")
    before_image, _ = generate(host_reforge)
    params = {name: p for name, p in model.named_parameters()}
    assert all(p.is_inference() for p in params.values())
    state = model_state(model)
    assert not host_reforge.shared.opts.training_xattention_optimizations

    result = jobs.run_training(config(), references)

    assert [f.name for f in result.files] == ["walle.pt", "walle-neg.pt"] and result.step == 2
    assert all((host_reforge.embeddings_dir / f.name).is_file() for f in result.files)
    load = model_management.calls[-1]  # the whole parts, loaded outside inference mode
    assert not load["inference_mode"] and load["force_full_load"] and len(load["models"]) == 3
    assert {name: p for name, p in model.named_parameters()} == params  # the same objects put back
    assert all(a is b for a, b in zip(params.values(), dict(model.named_parameters()).values(), strict=True))
    assert_same_state(state, model_state(model))
    after_image, _ = generate(host_reforge)
    assert np.array_equal(before_image, after_image)
    _, processed = generate(host_reforge, prompt="a photo of walle")
    assert "Negative prompt: walle-neg" in processed.infotexts[0] and "DreamArtist: walle" in processed.infotexts[0]


def test_a_lora_of_an_earlier_generation_is_off_for_the_run_and_works_after(host_reforge, references):
    from ldm_patched.modules import model_management

    from extensions_builtin_compat import jobs

    model = host_reforge.load_model("sd1")
    plain, _ = generate(host_reforge)
    lora = model.forge_objects_original.unet.clone()
    lora.add_patches(lora_patch(model))
    model.forge_objects_after_applying_lora.unet = lora  # what reForge's Lora activation leaves
    with_lora, _ = generate(host_reforge)
    assert not np.array_equal(plain, with_lora)
    seen = []

    jobs.run_training(config(), references, on_progress=lambda progress: seen.append(
        [m is model.forge_objects_original.unet for m in model_management.current_loaded_models[:1]]))

    assert seen == [[True]] * 2  # trained on the LoRA-free UNet
    assert np.array_equal(generate(host_reforge)[0], with_lora)
    model.forge_objects_after_applying_lora = model.forge_objects_original.shallow_copy()
    assert np.array_equal(generate(host_reforge)[0], plain)


def test_training_on_a_fresh_model_equals_training_after_a_generation(host_reforge, references):
    from extensions_builtin_compat import jobs

    host_reforge.load_model("sd1")
    fresh = jobs.run_training(config(), references)
    generate(host_reforge)
    again = jobs.run_training(config(overwrite=True), references)
    assert fresh.losses == again.losses


@pytest.mark.parametrize("forge_host", ["host_reforge", "host_classic"])
def test_sdxl_trains_on_the_webui_model_and_leaves_it_as_it_was(request, forge_host, references):
    """reForge and Forge Classic keep the webui's sgm model over their ldm_patched parts: an SDXL pair (with
    adapters) trains there as in A1111, and the same seed gives the same image afterwards."""
    host = request.getfixturevalue(forge_host)
    from extensions_builtin_compat import jobs

    model = host.load_model("sdxl")
    before, image = model_state(model), generate(host)[0]
    result = jobs.run_training(config(adapters=True), references)
    assert result.step == 2 and (host.embeddings_dir / "walle.dreamartist-lora").is_file()
    pos, _ = pairfiles.load_pair(host.embeddings_dir, "walle")
    assert set(pos.vectors) == {"clip_l", "clip_g"}
    assert_same_state(before, model_state(model))
    assert np.array_equal(generate(host)[0], image)


def test_the_api_trains_with_and_without_adapters(host_reforge):
    from test_api import B64_PNG, TINY, api_client

    client = api_client(host_reforge)
    host_reforge.load_model("sd1")
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "walle", **TINY})
    assert response.status_code == 200, response.text
    assert response.json()["files"] == ["walle.pt", "walle-neg.pt"]
    response = client.post("/dreamartist/v1/train", json={"image": B64_PNG, "name": "eve", "adapters": True, **TINY})
    assert response.status_code == 200, response.text
    assert (host_reforge.embeddings_dir / "eve.dreamartist-lora").is_file()


def test_forge_classic_trains_through_its_in_place_residuals_as_reforge_does(host_classic, references):
    """Forge Classic keeps the webui's model object and database as reForge does, but its blocks add each residual
    in place onto the x their norm has just read, which fails a backward pass as it is; for the run the norms read a
    copy. No hook is left, and the losses equal those of the same blocks adding out of place."""
    from ldm_patched.ldm.modules.attention import BasicTransformerBlock

    from extensions_builtin_compat import host as probes
    from extensions_builtin_compat import jobs

    model = host_classic.load_model("sd1")
    blocks = [m for m in model.model.diffusion_model.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(probes.adds_residuals_in_place(block) for block in blocks)
    block, width = blocks[0], blocks[0].norm1.normalized_shape[0]
    x, context = torch.randn(1, 4, width, requires_grad=True), torch.randn(1, 3, block.attn2.to_k.in_features)
    with pytest.raises(RuntimeError, match="inplace"):
        block(x * 1, encoder_hidden_states=context).sum().backward()  # what Classic's own block does to a backward
    before_image, _ = generate(host_classic)
    state = model_state(model)

    result = jobs.run_training(config(), references)

    assert result.step == 2 and all(m._forward_pre_hooks == {} for b in blocks for m in b.children())
    assert_same_state(state, model_state(model))
    assert np.array_equal(before_image, generate(host_classic)[0])
    for block in blocks:  # the same blocks adding out of place, as reForge's do
        block.__class__ = BasicTransformerBlock.__mro__[1]
    assert jobs.run_training(config(overwrite=True), references).losses == result.losses


def test_sage_attention_gives_way_to_pytorch_attention_for_the_run(host_classic, monkeypatch):
    """ldm_patched picks SageAttention when installed, a kernel without a backward pass."""
    import sys
    import types

    from extensions_builtin_compat.host_backend import attention_with_backward

    def attention_sage(q, k, v, heads, mask=None): ...
    def attention_pytorch(q, k, v, heads, mask=None): ...
    module = types.SimpleNamespace(optimized_attention=attention_sage, optimized_attention_masked=attention_sage,
                                   attention_pytorch=attention_pytorch)
    monkeypatch.setitem(sys.modules, "ldm_patched.ldm.modules.attention", module)
    with attention_with_backward():
        assert module.optimized_attention is module.optimized_attention_masked is attention_pytorch
    assert module.optimized_attention is module.optimized_attention_masked is attention_sage


class CastingLinear(torch.nn.Linear):
    """ldm_patched's manual_cast Linear (reForge's and Classic's text encoders): its weights cast to the input's dtype
    at every forward."""

    ldm_patched_cast_weights = True

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_a_text_encoder_that_casts_its_fp16_weights_keeps_no_cast_copy_for_backward(host_classic):
    """The real Classic keeps its text encoders in fp16 on a CPU too and casts each layer to the float32 stream: with
    a gradient every cast copy lived until backward, and an SDXL identity's step (two encodes) held 6 GB of them."""
    from extensions_builtin_compat.host_backend import float32_where_cast

    encoder = torch.nn.Sequential(CastingLinear(64, 64), torch.nn.LayerNorm(64), CastingLinear(64, 64)).half()
    encoder[1].float()  # a layer that does not cast is left as it is
    encoder.requires_grad_(False)
    before = [(p, p.detach().clone()) for p in encoder.parameters()]
    x = torch.randn(2, 64, requires_grad=True)

    def cast_copies() -> int:
        own = {p.untyped_storage().data_ptr() for p in encoder.parameters()}
        copies = []

        def pack(tensor):
            if tensor.shape == (64, 64) and tensor.untyped_storage().data_ptr() not in own:
                copies.append(tensor.dtype)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            encoder(x).sum().backward()
        return len(copies)

    assert cast_copies() == 2  # as the host's layers run
    reference = encoder(x)
    with float32_where_cast(torch.nn.ModuleDict({"clip_l": encoder})):
        assert [p.dtype for p in encoder.parameters()] == [torch.float32] * 6
        assert cast_copies() == 0
        torch.testing.assert_close(encoder(x), reference, rtol=0, atol=0)  # the same values: the cast was exact
    for p, values in before:
        assert p.dtype == values.dtype and torch.equal(p, values)
    assert encoder[1].weight.dtype == torch.float32 and encoder[0].weight.dtype == torch.float16


@pytest.mark.parametrize("webui", ["host_reforge", "host_classic"])
def test_the_vae_encode_is_the_posterior_mode_though_classics_vae_samples_it(request, webui):
    """ldm_patched's VAE regularizer samples the posterior in Forge Classic (a real Classic gave a BARET re-edit no
    cached inversion: each encode of the same image differed); the backend's encode is its mode in both."""
    host = request.getfixturevalue(webui)
    from extensions_builtin_compat.host_backend import HostBackend

    model = host.load_model("sd1")
    backend = HostBackend()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    host_encodes = [model.encode_first_stage(pixels) for _ in range(2)]
    assert torch.equal(*host_encodes) is (webui == "host_reforge")
    assert torch.equal(backend.vae_encode(pixels), backend.vae_encode(pixels))
    assert model.first_stage_model.regularization.sample is (webui == "host_classic")  # put back
