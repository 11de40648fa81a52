"""SDXL through the stand-in webui (sgm-shaped, tests/fakehost/a1111/ldm/sdxl.py, on the weights of
tests/tiny_sdxl.py): the host backend against the webui's own conditioning and against the standalone SDXL backend,
training with the host left bit-identical, pairing and adapters at generation, pairs of another family skipped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_sdxl
import torch
from fakehost.checks import assert_same_state, class_forwards, model_state, write_pair
from PIL import Image

from dreamartist import pairfiles, size_conditioning
from dreamartist.backend import EPSILON, POOLED, TIME_IDS, V_PREDICTION, Backend, Conditioning
from dreamartist.config import TrainConfig
from dreamartist.images import prepare_reference

REPO = Path(__file__).resolve().parents[1]
L, G = tiny_sdxl.L_WIDTH, tiny_sdxl.G_WIDTH
REENTRANT_WARNING = "ignore:None of the inputs have requires_grad=True:UserWarning"  # 1.6.0's checkpointing


@pytest.fixture
def xl_host(host):
    host.load_model("sdxl")
    return host


def backend_of(host):
    from extensions_builtin_compat.host_backend_sdxl import SDXLHostBackend, backend_for

    backend = backend_for()
    assert isinstance(backend, SDXLHostBackend)
    return backend


def sdxl_pair(folder, name, seed=0, lengths=(3, 2), fmt="safetensors"):
    g = torch.Generator().manual_seed(seed)
    pos = {"clip_l": torch.randn(lengths[0], L, generator=g), "clip_g": torch.randn(lengths[0], G, generator=g)}
    neg = {"clip_l": torch.randn(lengths[1], L, generator=g), "clip_g": torch.randn(lengths[1], G, generator=g)}
    pairfiles.save_pair(folder, name, pos, neg, fmt=fmt)
    return pos, neg


def reload_embeddings():
    from modules.sd_hijack import model_hijack

    model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    return model_hijack.embedding_db


def test_describes_the_loaded_sdxl_model(xl_host):
    backend = backend_of(xl_host)
    assert isinstance(backend, Backend)
    assert (backend.family, backend.prediction_type, backend.embedding_dims) == ("sdxl", EPSILON,
                                                                                {"clip_l": L, "clip_g": G})
    expected = tiny_sdxl.backend().alphas_cumprod
    assert backend.alphas_cumprod.dtype == torch.float32 and torch.allclose(backend.alphas_cumprod, expected)
    model = xl_host.shared.sd_model
    words, ids = backend.word_vectors("robot arm"), model.cond_stage_model.tokenize(["robot arm"])[0]
    assert len(ids) == 2
    for key, embedder in zip(("clip_l", "clip_g"), model.conditioner.embedders):
        table = next(m for m in embedder.modules() if hasattr(m, "textual_inversion_key")).wrapped.weight
        assert torch.equal(words[key], table[ids].detach())
        assert torch.equal(backend.eos_vector()[key], table[49407].detach())


def test_v_prediction_comes_from_the_webui_model(host):
    host.load_model("sdxl-vpred")
    assert backend_of(host).prediction_type == V_PREDICTION


def test_zero_terminal_snr_setting_reaches_the_training_schedule(host_v1101):
    host_v1101.load_model("sdxl")
    host_v1101.shared.opts.sd_noise_schedule = "Zero Terminal SNR"
    from dreamartist.standalone.sdxl import rescale_zero_terminal_snr

    alphas = backend_of(host_v1101).alphas_cumprod
    assert torch.allclose(alphas, rescale_zero_terminal_snr(tiny_sdxl.backend().alphas_cumprod), atol=1e-7)


@pytest.mark.parametrize("prompt", ["a photo of walle", "a (walle:1.3) photo, " + "long " * 80])
def test_conditioning_equals_the_webuis_for_the_same_embedding_file(xl_host, prompt):
    """crossattn and vector (pooled text embedding + size embeddings) as the webui's get_learned_conditioning
    builds them from the saved file, with the crop from its settings; other time ids give another vector."""
    from modules import prompt_parser

    xl_host.shared.opts.sdxl_crop_top, xl_host.shared.opts.sdxl_crop_left = 16, 8
    backend = backend_of(xl_host)
    pos, _ = sdxl_pair(xl_host.embeddings_dir, "walle")
    model = xl_host.shared.sd_model
    with torch.no_grad():
        ours = backend.encode([prompt], {"walle": pos})
        ours.extras[TIME_IDS] = size_conditioning.time_ids((96, 80), (16, 8), (96, 80))[None]
        cond = backend._unet_cond(torch.zeros(1, 4, 12, 10), ours)
        reload_embeddings()
        webui = model.get_learned_conditioning(prompt_parser.SdConditioning([prompt], width=80, height=96))
        other = backend._unet_cond(torch.zeros(1, 4, 12, 10), Conditioning(ours.context, extras={
            POOLED: ours.extras[POOLED], TIME_IDS: size_conditioning.time_ids((96, 80), (0, 0), (96, 80))[None]}))
    assert cond["crossattn"].shape[1] == (154 if "long" in prompt else 77)
    assert torch.equal(cond["crossattn"], webui["crossattn"]) and torch.equal(cond["vector"], webui["vector"])
    assert not torch.equal(other["vector"], webui["vector"])
    assert cond["vector"].shape == (1, tiny_sdxl.POOLED_WIDTH + 6 * tiny_sdxl.TIME_WIDTH)


def test_the_webui_path_equals_the_standalone_backend_on_the_same_weights(xl_host):
    """Context, pooled vector and UNet output of the host backend (sgm's modules, open_clip-shaped OpenCLIP-G,
    label_emb) and of the standalone one (diffusers' text_time UNet, transformers' encoders)."""
    host_backend, standalone = backend_of(xl_host), tiny_sdxl.backend(seed=0)
    words = {"walle": {"clip_l": torch.randn(2, L), "clip_g": torch.randn(2, G)}}
    prompts = ["a photo of walle", "(walle:1.2), a cat"]
    with torch.no_grad():
        ours, theirs = host_backend.encode(prompts, words), standalone.encode(prompts, words)
        assert torch.allclose(ours.context, theirs.context, atol=1e-5)
        assert torch.allclose(ours.extras[POOLED], theirs.extras[POOLED], atol=1e-5)
        ids = torch.tensor([[96.0, 80, 16, 8, 64, 64], [64, 64, 0, 0, 64, 64]])
        ours.extras[TIME_IDS] = theirs.extras[TIME_IDS] = ids
        latents, t = torch.randn(2, 4, 8, 8), torch.tensor([20, 800])
        assert torch.allclose(host_backend.unet(latents, t, ours), standalone.unet(latents, t, theirs), atol=1e-4)
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.allclose(host_backend.vae_encode(pixels), standalone.vae_encode(pixels), atol=1e-5)


def test_gradient_reaches_both_encoders_vectors_only(xl_host):
    backend = backend_of(xl_host)
    pos = {"clip_l": torch.randn(2, L, requires_grad=True), "clip_g": torch.randn(2, G, requires_grad=True)}
    model = xl_host.shared.sd_model
    with backend.training():
        cond = backend.encode(["a photo of walle"], {"walle": pos})
        backend.unet(torch.randn(1, 4, 8, 8), torch.tensor([300]), cond).square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in pos.values())
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


@pytest.mark.filterwarnings(REENTRANT_WARNING)
def test_training_writes_an_sdxl_pair_the_webui_loads_and_leaves_the_host_as_it_was(xl_host):
    from modules.sd_hijack import model_hijack

    from extensions_builtin_compat import embeddings, jobs

    image = Image.new("RGB", (80, 64), (200, 120, 40))
    image.paste((30, 60, 200), (16, 8, 48, 40))
    model = xl_host.shared.sd_model
    before, forwards = model_state(model), class_forwards()
    config = TrainConfig(name="walle", steps=2, width=64, height=64, init_words="robot", gradient_checkpointing=True)
    result = jobs.run_training(config, [prepare_reference(image, 64, 64)])
    assert [f.name for f in result.files] == ["walle.pt", "walle-neg.pt"] and np.isfinite(result.final_loss)
    assert_same_state(before, model_state(model))
    assert class_forwards() == forwards and model_hijack.optimization_method == "sdp"
    db = model_hijack.embedding_db
    for path in result.files:
        vec, saved = db.word_embeddings[path.stem].vec, pairfiles.load_embedding(path).vectors
        assert set(vec) == {"clip_l", "clip_g"} and all(torch.equal(vec[k], saved[k]) for k in saved)
        assert db.word_embeddings[path.stem].shape == L + G
    assert embeddings.pairs() == ["walle"]


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_files_round_trip_through_the_webuis_sdxl_loader(xl_host, fmt):
    pos, neg = sdxl_pair(xl_host.embeddings_dir, "walle", fmt=fmt)
    write_pair(xl_host.embeddings_dir, "robo", width=768)  # an SD1 pair: another shape, skipped
    db = reload_embeddings()
    for name, vectors in (("walle", pos), ("walle-neg", neg)):
        embedding = db.word_embeddings[name]
        assert embedding.vectors == vectors["clip_l"].shape[0] and embedding.shape == L + G
        assert all(torch.equal(embedding.vec[k], vectors[k]) for k in vectors)
    assert set(db.skipped_embeddings) == {"robo", "robo-neg"}


@pytest.fixture
def hooked(xl_host):
    sdxl_pair(xl_host.embeddings_dir, "walle", seed=1)
    write_pair(xl_host.embeddings_dir, "robo", width=768)
    xl_host.load_extension(REPO)
    return xl_host


def generate(host, prompt, mode="pair", **fields):
    p = host.txt2img(script_args={"dreamartist": [True, mode, 0.8, 0.65]}, prompt=prompt, seed=3, steps=2, **fields)
    return p, host.process_images(p)


def test_pairing_adds_name_neg_on_sdxl(hooked):
    from modules import processing

    p, processed = generate(hooked, "a photo of walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, walle-neg"]
    assert list(processing.StableDiffusionProcessingTxt2Img.cached_uc[0][0]) == ["blurry, walle-neg"]
    assert "DreamArtist: walle" in processed.infotexts[0] and not processed.comments


def test_a_pair_of_another_family_is_skipped_with_a_message(hooked, caplog):
    p, processed = generate(hooked, "a photo of robo", negative_prompt="")
    assert p.all_negative_prompts == [""]
    assert "robo was made for another model family (768-wide vectors, this model takes 40)" in processed.comments
    assert "robo was made for another model family" in caplog.text


def test_adapters_act_on_their_branches_on_sdxl(hooked):
    from test_host_adapters import Recorder, random_groups

    model = hooked.shared.sd_model
    groups = random_groups(model, 3)
    assert any(k.startswith("clip_l.") for k in groups["te_pos"]) and any(k.startswith("clip_g.") for k in
                                                                          groups["te_pos"])
    pos, neg = pairfiles.load_pair(hooked.embeddings_dir, "walle")
    pairfiles.save_pair(hooked.embeddings_dir, "walle", pos.vectors, neg.vectors, fmt="safetensors", overwrite=True,
                        adapters=groups)
    before = model_state(model)
    _, plain = generate(hooked, "a photo of walle", mode="off")
    p = hooked.txt2img(script_args={"dreamartist": [True, "pair", 0.8, 0.65]}, prompt="a photo of walle", seed=3,
                       steps=2)
    recorder = Recorder(model)
    try:
        processed = hooked.process_images(p)
    finally:
        recorder.close()
    assert recorder.unet == [[["walle:pos"], ["walle:neg"]]] * 2
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(processed.images[0]))
    assert "DreamArtist adapters: \"pair, 0.8, 0.65\"" in processed.infotexts[0]
    assert_same_state(before, model_state(model))


def test_a_text_adapter_acts_on_its_rows_of_the_sequence_first_openclip_tower(xl_host):
    """OpenCLIP's blocks in sgm run (tokens, rows, width): the adapter finds the rows on the second axis."""
    from test_host_adapters import random_groups

    from dreamartist import adapters

    backend = backend_of(xl_host)
    groups = random_groups(xl_host.shared.sd_model, 5)
    clip_g = {k: v for k, v in groups["te_pos"].items() if k.startswith("clip_g.")}
    assert any(".mlp.fc1." in k for k in clip_g)
    prompts = ["a photo of a cat", "a photo of a cat"]
    with torch.no_grad():
        plain = backend.encode(prompts).context
        with backend.patched({"te": {"pos": (adapters.unflatten(clip_g), 1.0)}}):
            patched = backend.encode(prompts, branches=("pos", "")).context
    assert torch.equal(patched[1], plain[1]) and torch.equal(patched[0, :, :L], plain[0, :, :L])
    assert not torch.allclose(patched[0, :, L:], plain[0, :, L:])
