"""HostBackend on the stand-in webui 1.6.0 and 1.10.1: the Backend operations match the webui's own paths."""
from __future__ import annotations

import pytest
import torch

from dreamartist.backend import EPSILON, V_PREDICTION, Backend, Conditioning
from dreamartist.errors import InputError, ModelError


def backend_for(host, kind="sd1"):
    if kind != "sd1":
        host.load_model(kind)
    from extensions_builtin_compat.host_backend import HostBackend

    return HostBackend()


def saved_embedding(host, name, vec):
    """Write ``vec`` as a webui embedding file and have the database load it, as a user's file would be."""
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    Embedding(vec, name).save(str(host.embeddings_dir / f"{name}.pt"))
    model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)


def test_describes_the_loaded_sd1_model(host):
    backend = backend_for(host)
    model = host.shared.sd_model
    assert isinstance(backend, Backend)
    assert (backend.family, backend.prediction_type, backend.embedding_dims) == ("sd1", EPSILON, {"clip_l": 32})
    assert backend.alphas_cumprod.dtype == torch.float32 and backend.alphas_cumprod.device.type == "cpu"
    assert torch.equal(backend.alphas_cumprod, model.alphas_cumprod)
    assert backend.model_hash == model.sd_model_hash and backend.model_name == "tiny-test"
    assert (backend.latent_channels, backend.vae_scale) == (4, 8)


def test_alphas_are_float32_even_when_the_model_was_halved(host):
    model = host.load_model("sd1", half=True)
    from extensions_builtin_compat.host_backend import HostBackend

    expected_buffer = torch.float16 if host.flags.alphas_follow_half else torch.float32
    assert model.alphas_cumprod.dtype == expected_buffer
    alphas = HostBackend().alphas_cumprod
    assert alphas.dtype == torch.float32
    assert torch.allclose(alphas, model.alphas_cumprod.float(), atol=1e-3)


def test_word_and_eos_vectors_are_rows_of_the_token_table(host):
    backend = backend_for(host)
    clip = host.shared.sd_model.cond_stage_model
    table = clip.wrapped.transformer.get_input_embeddings().wrapped.weight
    ids = clip.tokenize(["robot arm"])[0]
    assert len(ids) == 2
    assert torch.equal(backend.word_vectors("robot arm")["clip_l"], table[ids].detach())
    assert torch.equal(backend.eos_vector()["clip_l"], table[49407].detach())
    assert backend.word_vectors("")["clip_l"].shape == (0, 32)


@pytest.mark.parametrize("prompt", ["a photo of walle", "a (walle:1.3) and [walle], " + "long " * 80])
def test_encode_equals_the_webui_encoding_of_the_same_embedding_file(host, prompt):
    backend = backend_for(host)
    vec = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backend.encode([prompt, "no words here"], {"walle": {"clip_l": vec}}).context
        saved_embedding(host, "walle", vec)
        webui = host.shared.sd_model.cond_stage_model([prompt, "no words here"])
    assert ours.shape == webui.shape and ours.shape[1] == (154 if "long" in prompt else 77)
    assert torch.equal(ours, webui)


def test_encode_gradient_reaches_the_learned_tensors_only(host):
    backend = backend_for(host)
    pos = torch.randn(2, 32, requires_grad=True)
    neg = torch.randn(2, 32, requires_grad=True)
    unused = torch.randn(2, 32, requires_grad=True)
    model = host.shared.sd_model
    with backend.training():
        cond = backend.encode(["walle-neg", "a photo of walle"],
                              {"walle": {"clip_l": pos}, "walle-neg": {"clip_l": neg}, "other": {"clip_l": unused}})
        out = backend.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), cond)
        out.square().mean().backward()
    assert pos.grad.abs().sum() > 0 and neg.grad.abs().sum() > 0
    assert unused.grad is None
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


def test_encode_puts_the_database_back_exactly(host):
    backend = backend_for(host)
    saved_embedding(host, "walle", torch.ones(1, 32))
    saved_embedding(host, "fresh-look", torch.ones(1, 32))  # "fresh" starts with its token: the webui grows that list
    from modules.sd_hijack import model_hijack

    db = model_hijack.embedding_db
    assert host.shared.sd_model.cond_stage_model.tokenize(["fresh"])[0][0] in db.ids_lookup
    words, lookup = list(db.word_embeddings.items()), {k: list(v) for k, v in db.ids_lookup.items()}
    backend.encode(["walle fresh"], {"walle": {"clip_l": torch.zeros(2, 32)}, "fresh": {"clip_l": torch.zeros(1, 32)}})
    assert list(db.word_embeddings.items()) == words
    assert {k: list(v) for k, v in db.ids_lookup.items()} == lookup

    def broken(texts):
        raise RuntimeError("encoder failed")

    host.shared.sd_model.cond_stage_model.process_texts = broken
    with pytest.raises(RuntimeError):
        backend.encode(["walle"], {"walle": {"clip_l": torch.zeros(2, 32)}})
    assert list(db.word_embeddings.items()) == words
    assert {k: list(v) for k, v in db.ids_lookup.items()} == lookup


def test_encode_rejects_vectors_of_another_width(host):
    backend = backend_for(host)
    with pytest.raises(InputError, match=r"\(n, 32\)"):
        backend.encode(["walle"], {"walle": {"clip_l": torch.zeros(2, 768)}})
    with pytest.raises(InputError, match="clip_l"):
        backend.encode(["walle"], {"walle": {"clip_h": torch.zeros(2, 32)}})


def test_unet_vae_encode_and_decode_use_the_webui_model(host):
    backend = backend_for(host)
    model = host.shared.sd_model
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 999])
    cond = Conditioning(torch.randn(2, 77, 32))
    with torch.no_grad():
        assert torch.equal(backend.unet(x, t, cond), model.apply_model(x, t, {"c_crossattn": [cond.context]}))
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        expected = model.first_stage_model.encode(pixels).mean * 0.18215
    latents = backend.vae_encode(pixels)
    assert torch.equal(latents, expected) and torch.equal(latents, backend.vae_encode(pixels))
    z = latents.clone().requires_grad_(True)
    decoded = backend.vae_decode(z)
    assert decoded.shape == (1, 3, 64, 64)
    decoded.sum().backward()
    assert z.grad.abs().sum() > 0


def test_sd2_is_v_prediction_with_its_own_encoder(host):
    backend = backend_for(host, "sd2")
    assert (backend.family, backend.prediction_type, backend.embedding_dims) == ("sd2", V_PREDICTION, {"clip_h": 48})
    vec = torch.randn(2, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = backend.encode(["a photo of walle"], {"walle": {"clip_h": vec}}).context
        saved_embedding(host, "walle", vec)
        assert torch.equal(ours, host.shared.sd_model.cond_stage_model(["a photo of walle"]))
    cond = backend.encode(["walle"], {"walle": {"clip_h": vec.clone().requires_grad_(True)}})
    assert cond.context.shape == (1, 77, 48)


@pytest.mark.parametrize("kind, message", [("sdxl-refiner", "SDXL refiner"), ("sdxl-inpainting", "SDXL inpainting")])
def test_sdxl_refiner_and_inpainting_are_refused_with_a_clear_message(host, kind, message):
    host.load_model(kind)
    from extensions_builtin_compat import host as probes
    from extensions_builtin_compat.host_backend import HostBackend

    with pytest.raises(ModelError, match=message):
        HostBackend()
    assert message in probes.training_unavailable_reason()


def test_inpainting_checkpoint_is_refused_with_a_clear_message(host):
    host.load_model("sd1-inpainting")  # an SD1 model to the webui (is_sd1), but its UNet wants c_concat too
    from extensions_builtin_compat import host as probes
    from extensions_builtin_compat.host_backend import HostBackend

    assert host.shared.sd_model.is_sd1
    with pytest.raises(ModelError, match="inpainting"):
        HostBackend()
    assert "inpainting" in probes.training_unavailable_reason()


def test_alphas_are_the_float32_original_when_sampling_downcasts_them(host_v1101):
    host_v1101.shared.opts.use_downcasted_alpha_bar = True
    model = host_v1101.load_model("sd1")
    host_v1101.process_images(host_v1101.txt2img(prompt="a photo"))  # applies the per-generation override
    from extensions_builtin_compat.host_backend import HostBackend

    assert model.alphas_cumprod.dtype == torch.float16
    assert torch.equal(HostBackend().alphas_cumprod, model.alphas_cumprod_original)


def test_lowvram_is_refused(host):
    host.shared.sd_model.lowvram = True
    from extensions_builtin_compat.host_backend import HostBackend

    with pytest.raises(ModelError, match="--lowvram"):
        HostBackend()


def test_forge_trains_through_its_engine_once_its_model_loads(host_forge):
    from extensions_builtin_compat import host as probes
    from extensions_builtin_compat.host_backend_forge import ForgeBackend
    from extensions_builtin_compat.host_backend_sdxl import backend_for

    assert probes.is_forge() and not probes.has_embedding_db()
    host_forge.load_model("sd1")
    assert probes.training_unavailable_reason() is None and isinstance(backend_for(), ForgeBackend)


def test_feature_probes_follow_the_host(host):
    from extensions_builtin_compat import host as probes

    assert not probes.is_forge() and probes.has_embedding_db()
    assert probes.loaded_model() is None  # probing never loads a model
    assert probes.training_unavailable_reason() is None
