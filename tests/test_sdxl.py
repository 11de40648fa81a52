"""SDXL in the standalone backend (tests/tiny_sdxl.py: the libraries' own classes at toy size, random weights):
both text encoders, the pooled vector and size conditioning, checkpoints, files, training, the CLI."""
from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

import tiny_sdxl  # noqa: E402
from test_standalone import REAL_LAYOUTS  # noqa: E402

from dreamartist import losses, pairfiles, size_conditioning  # noqa: E402
from dreamartist.backend import POOLED, TIME_IDS, V_PREDICTION, Conditioning  # noqa: E402
from dreamartist.config import TrainConfig  # noqa: E402
from dreamartist.errors import InputError, ModelError  # noqa: E402
from dreamartist.families import FAMILIES  # noqa: E402
from dreamartist.images import prepare_reference  # noqa: E402
from dreamartist.standalone.backend import scaled_linear_alphas_cumprod  # noqa: E402
from dreamartist.standalone.checkpoint import CONFIG_ROOT, detect_family, load_checkpoint  # noqa: E402
from dreamartist.standalone.sdxl import rescale_zero_terminal_snr  # noqa: E402
from dreamartist.trainer import Trainer, train  # noqa: E402

SIZE = 64
BOS, EOS = 49406, 49407
A_PHOTO_OF_A_CAT = [BOS, 320, 1125, 539, 320, 2368, EOS]


@pytest.fixture(scope="module")
def xl():
    return tiny_sdxl.backend(seed=0)


@pytest.fixture(scope="module")
def references():
    image = Image.new("RGB", (80, 64), (200, 120, 40))  # wider than tall: the centre crop starts 8 px in
    image.paste((30, 60, 200), (20, 10, 60, 50))
    return [prepare_reference(image, SIZE, SIZE, caption="orange box")]


def _ids(tokens: list[int], pad: int) -> torch.Tensor:
    return torch.tensor([tokens + [pad] * (77 - len(tokens))])


# ---- the two text encoders ------------------------------------------------------------------------------------


def test_the_backend_has_both_encoders(xl):
    assert xl.family == "sdxl"
    assert xl.embedding_dims == {"clip_l": tiny_sdxl.L_WIDTH, "clip_g": tiny_sdxl.G_WIDTH}
    words, eos = xl.word_vectors("a robot"), xl.eos_vector()
    assert {k: tuple(v.shape) for k, v in words.items()} == {"clip_l": (2, 16), "clip_g": (2, 24)}
    for key, model in xl.text_encoders.items():
        table = model.get_input_embeddings().weight.detach()
        assert torch.equal(eos[key], table[EOS]) and torch.equal(words[key], table[[320, 8797]])


def test_context_is_both_penultimate_layers_and_pooled_is_clip_g_projected(xl):
    """CLIP-L pads with EOS, OpenCLIP-G with 0; each contributes its penultimate hidden state (no final norm);
    the pooled vector is OpenCLIP-G's projected EOS state, as sgm's FrozenOpenCLIPEmbedder2 computes it."""
    cond = xl.encode(["a photo of a cat"])
    clip_l = xl.text_encoders["clip_l"](input_ids=_ids(A_PHOTO_OF_A_CAT, EOS), output_hidden_states=True)
    clip_g = xl.text_encoders["clip_g"](input_ids=_ids(A_PHOTO_OF_A_CAT, 0), output_hidden_states=True)
    assert torch.equal(cond.context, torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1))
    assert not torch.equal(clip_g.hidden_states[-2], clip_g.last_hidden_state)
    projection = xl.text_encoders["clip_g"].text_projection.weight
    norm = xl.text_encoders["clip_g"].get_submodule("text_model.final_layer_norm")
    pooled = norm(clip_g.hidden_states[-1])[:, len(A_PHOTO_OF_A_CAT) - 1] @ projection.T
    assert torch.allclose(cond.extras[POOLED], pooled, atol=1e-6)


def test_words_are_spliced_into_both_encoders_with_gradient(xl):
    words = {"walle": {"clip_l": torch.randn(2, 16, requires_grad=True),
                       "clip_g": torch.randn(2, 24, requires_grad=True)}}
    cond = xl.encode(["a photo of walle", "a photo of walle"], words)
    (cond.context.square().mean() + cond.extras[POOLED].square().mean()).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in words["walle"].values())
    assert all(p.grad is None for m in xl.modules for p in m.parameters())
    with pytest.raises(InputError, match="clip_g"):
        xl.encode(["walle"], {"walle": {"clip_l": torch.zeros(2, 16)}})
    with pytest.raises(InputError, match="different number of vectors"):
        xl.encode(["walle"], {"walle": {"clip_l": torch.zeros(2, 16), "clip_g": torch.zeros(3, 24)}})


# ---- the UNet's added conditioning ----------------------------------------------------------------------------


def test_unet_gets_the_pooled_vector_and_the_time_ids(xl):
    """The output is the diffusers UNet's with text_embeds = pooled and time_ids as given; dropping or changing
    either changes it, and without time ids sampling's defaults for the latents' size apply."""
    cond = xl.encode(["a photo of a cat", "a dog"])
    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    ids = torch.tensor([[96.0, 80, 0, 8, 64, 64], [64, 64, 0, 0, 64, 64]])
    cond.extras[TIME_IDS] = ids
    out = xl.unet(latents, t, cond)
    expected = xl.unet_model(latents, t, encoder_hidden_states=cond.context,
                             added_cond_kwargs={"text_embeds": cond.extras[POOLED], "time_ids": ids}).sample
    assert torch.equal(out, expected)
    for changed in ({POOLED: torch.zeros_like(cond.extras[POOLED])}, {TIME_IDS: ids.flip(0)},
                    {TIME_IDS: torch.zeros_like(ids)}):
        other = Conditioning(cond.context, extras={**cond.extras, **changed})
        assert (xl.unet(latents, t, other) - out).abs().max() > 1e-3, changed
    defaults = Conditioning(cond.context, extras={POOLED: cond.extras[POOLED]})
    assert torch.equal(xl.unet(latents, t, defaults),
                       xl.unet(latents, t, Conditioning(cond.context, extras={
                           POOLED: cond.extras[POOLED], TIME_IDS: size_conditioning.defaults(64, 64, 2)})))
    with pytest.raises(ValueError, match="pooled"):
        xl.unet(latents, t, Conditioning(cond.context))


def test_a_reference_keeps_its_original_size_and_crop(references):
    (ref,) = references
    assert ref.original_size == (64, 80) and ref.crop_top_left == (0, 8)
    assert size_conditioning.for_references(references).tolist() == [[64.0, 80.0, 0.0, 8.0, 64.0, 64.0]]
    tall = prepare_reference(Image.new("RGB", (100, 300)), 64, 64)  # scaled by 0.64 to 64x192, cropped 64 down
    assert (tall.original_size, tall.crop_top_left) == ((300, 100), (64, 0))


def test_the_objective_gives_each_row_its_reference_size(xl, references, tmp_path, monkeypatch):
    seen = []
    original = type(xl).unet

    def spy(self, latents, timesteps, cond):
        seen.append(cond.extras[TIME_IDS].clone())
        return original(self, latents, timesteps, cond)

    monkeypatch.setattr(type(xl), "unet", spy)
    trainer = Trainer(xl, TrainConfig(name="walle", steps=1, width=SIZE, height=SIZE, reconstruction=False),
                      references, tmp_path)
    trainer.run()
    assert seen and seen[0].tolist() == [[64.0, 80.0, 0.0, 8.0, 64.0, 64.0]] * 2  # the S^n row and the S^p row


# ---- training -------------------------------------------------------------------------------------------------


def _probe(xl, trainer, probes) -> float:
    words = trainer.objective.words(trainer.params)
    z0 = xl.vae_encode(trainer.references[0].pixels.unsqueeze(0))
    total = 0.0
    with torch.no_grad():
        cond = xl.encode(["a photo of a walle-neg", "a photo of a walle"], words)
        cond.extras[TIME_IDS] = size_conditioning.for_references(trainer.references).repeat(2, 1)
        for t, noise in probes:
            abar = xl.alphas_cumprod[t].view(-1, 1, 1, 1)
            z_t = losses.add_noise(z0, noise, abar)
            out_neg, out_pos = xl.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), cond).chunk(2)
            total += losses.da_loss(losses.guide(out_neg, out_pos, torch.tensor([3.0])), noise).item()
    return total / len(probes)


def test_training_lowers_the_loss_and_leaves_the_model_as_it_was(xl, references, tmp_path):
    generator = torch.Generator().manual_seed(123)
    probes = [(torch.tensor([t]), torch.randn((1, 4, 8, 8), generator=generator)) for t in range(25, 1000, 75)]
    before_state = [t.clone() for m in xl.modules for t in m.state_dict().values()]
    flags = [p.requires_grad for m in xl.modules for p in m.parameters()]
    config = TrainConfig(name="walle", steps=30, lr=0.01, batch_size=4, reconstruction=False, width=SIZE,
                         height=SIZE, template="a photo of a [name]", gradient_checkpointing=True)
    trainer = Trainer(xl, config, references, tmp_path)
    trainer._start()
    before = _probe(xl, trainer, probes)
    result = trainer.run()
    after = _probe(xl, trainer, probes)
    # As on the SD1 random model, the improvement of a random toy model is small but systematic (about 0.7% here).
    assert after < before * 0.996, (before, after)
    after_state = [t for m in xl.modules for t in m.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before_state, after_state))
    assert flags == [p.requires_grad for m in xl.modules for p in m.parameters()]
    pos, neg = pairfiles.load_pair(tmp_path, "walle")
    assert result.step == 30 and pos.layout == neg.layout == "sdxl"
    assert {k: tuple(v.shape) for k, v in pos.vectors.items()} == {"clip_l": (3, 16), "clip_g": (3, 24)}


def test_adapters_cover_the_unet_and_both_text_encoders(xl, references, tmp_path):
    layers = xl.adapter_layers()
    assert any(re.search(r"attentions\.\d+\.transformer_blocks\.1\.attn2\.to_k$", n) for n in layers["unet"])
    text = sorted(layers["te"])
    assert any(n.startswith("clip_l.text_model.encoder.layers.0.") for n in text)
    assert any(n.startswith("clip_g.text_model.encoder.layers.2.") for n in text)
    assert all(n.split(".", 1)[0] in ("clip_l", "clip_g") for n in text)
    config = TrainConfig(name="walle", steps=2, adapters=True, width=SIZE, height=SIZE, reconstruction=False,
                         unet_lr_pos=0.05, unet_lr_neg=0.05, text_lr=0.05)
    train(xl, config, references, tmp_path)
    groups = pairfiles.load_adapters(tmp_path, "walle")
    assert set(groups) == {"unet_pos", "unet_neg", "te_pos", "te_neg"}
    assert any(key.startswith("clip_g.") for key in groups["te_pos"])
    assert all(t.abs().sum() > 0 for key, t in groups["unet_pos"].items() if key.endswith("lora_up"))


# ---- files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_pair_files_hold_clip_l_and_clip_g_only(xl, tmp_path, fmt):
    pos = {"clip_l": torch.randn(3, 16), "clip_g": torch.randn(3, 24)}
    neg = {"clip_l": torch.randn(2, 16), "clip_g": torch.randn(2, 24)}
    files = pairfiles.save_pair(tmp_path, "walle", pos, neg, fmt=fmt)
    if fmt == "pt":
        data = torch.load(files[0], weights_only=True)
        assert set(data) == {"clip_l", "clip_g"}  # the webui's SDXL reader calls .detach() on every value
    loaded = pairfiles.load_pair(tmp_path, "walle")
    for file, vectors in zip(loaded, (pos, neg)):
        assert all(torch.equal(file.vectors[k], vectors[k]) for k in vectors)
    cond = xl.encode(["walle", "walle-neg"], {"walle": loaded[0].vectors, "walle-neg": loaded[1].vectors})
    assert cond.context.shape == (2, 77, 40)


# ---- checkpoints ----------------------------------------------------------------------------------------------


def _write_checkpoint(xl, path, **extra):
    from safetensors.torch import save_file

    save_file({**tiny_sdxl.sgm_state_dict(xl), **extra}, str(path))
    return path


def test_single_file_round_trip(xl, tmp_path):
    path = _write_checkpoint(xl, tmp_path / "tiny-xl.safetensors")
    configs = tiny_sdxl.write_configs(tmp_path / "configs")
    loaded = load_checkpoint(path, config_dir=configs, device="cpu")
    assert (type(loaded).__name__, loaded.family, loaded.prediction_type) == ("SDXLBackend", "sdxl", "epsilon")
    for a, b in zip(xl.modules, loaded.modules):
        left, right = a.state_dict(), b.state_dict()
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    assert torch.equal(loaded.alphas_cumprod, scaled_linear_alphas_cumprod())
    cond, again = xl.encode(["a photo of a cat"]), loaded.encode(["a photo of a cat"])
    latents = torch.randn(1, 4, 8, 8)
    assert torch.equal(cond.context, again.context) and torch.equal(cond.extras[POOLED], again.extras[POOLED])
    out, out_again = xl.unet(latents, torch.tensor([3]), cond), loaded.unet(latents, torch.tensor([3]), again)
    assert torch.allclose(out, out_again, atol=1e-5)  # the same weights; kernels may pick other summation orders


def test_v_prediction_and_zero_terminal_snr_come_from_the_checkpoint(xl, tmp_path):
    configs = tiny_sdxl.write_configs(tmp_path / "configs")
    path = _write_checkpoint(xl, tmp_path / "vpred.safetensors", v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    loaded = load_checkpoint(path, config_dir=configs, device="cpu")
    assert loaded.prediction_type == V_PREDICTION
    assert torch.equal(loaded.alphas_cumprod, rescale_zero_terminal_snr(scaled_linear_alphas_cumprod()))
    assert load_checkpoint(path, config_dir=configs, prediction_type="epsilon").prediction_type == "epsilon"
    plain = _write_checkpoint(xl, tmp_path / "plain.safetensors")
    (tmp_path / "plain.yaml").write_text("denoiser_config:\n  params:\n    scaling_config:\n      target: "
                                         "sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n")
    assert load_checkpoint(plain, config_dir=configs).prediction_type == V_PREDICTION


def test_zero_terminal_snr_matches_the_published_rescaling():
    abar = scaled_linear_alphas_cumprod()
    rescaled = rescale_zero_terminal_snr(abar)
    root, first, last = abar.double().sqrt(), abar.double().sqrt()[0], abar.double().sqrt()[-1]
    expected = ((root - last) * first / (first - last)) ** 2
    assert torch.allclose(rescaled[:-1].double(), expected[:-1], rtol=1e-6)
    assert rescaled[0] == abar[0] and 0 < rescaled[-1] < 1e-7


def test_refiner_and_inpainting_checkpoints_are_refused():
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    base = {**unet, "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}
    assert detect_family(base) == "sdxl"
    with pytest.raises(ModelError, match="SDXL refiner"):
        detect_family({**unet, "conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)})
    with pytest.raises(ModelError, match="SDXL inpainting"):
        detect_family({**base, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)})


REAL_SDXL_KEYS = {  # shapes in the released SDXL base file
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
}


def test_shipped_configs_build_sdxl_base_and_convert_its_layout():
    """Parameter counts of the released SDXL base (UNet, VAE, CLIP-L, OpenCLIP-G text with projection), and a
    full-size file of the original layout mapping onto every weight (meta device: shapes only)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dreamartist.standalone import checkpoint

    folder = CONFIG_ROOT / "sdxl"
    unet, vae, clip_l = checkpoint.empty_models(folder)
    with torch.device("meta"):
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(checkpoint.read_config(folder, "text_encoder_2")))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, clip_l, clip_g)]
    assert counts == [2_567_463_684, REAL_LAYOUTS["sd1"]["params"][1], REAL_LAYOUTS["sd1"]["params"][2], 694_659_840]
    models = type("Meta", (), {"unet_model": unet, "vae_model": vae,
                               "text_encoders": {"clip_l": clip_l, "clip_g": clip_g}})
    original = tiny_sdxl.sgm_state_dict(models)
    for key, shape in REAL_SDXL_KEYS.items():
        assert tuple(original[key].shape) == shape, key
    assert detect_family(original) == "sdxl"
    converted = [*checkpoint.convert_weights(original, "sdxl", unet, vae, clip_l),
                 checkpoint.text_encoder_weights(original, clip_g, "conditioner.embedders.1.model.")]
    for model, weights in zip((unet, vae, clip_l, clip_g), converted):
        wanted = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        assert {k: tuple(weights[k].shape) for k in wanted if k in weights} == wanted


# ---- the command line -----------------------------------------------------------------------------------------


def test_cli_trains_and_generates_with_an_sdxl_checkpoint(xl, tmp_path, monkeypatch, capsys):
    from dreamartist import cli
    from dreamartist.standalone import checkpoint

    tiny_sdxl.write_configs(tmp_path / "configs" / "sdxl")
    monkeypatch.setattr(checkpoint, "CONFIG_ROOT", tmp_path / "configs")
    ckpt = _write_checkpoint(xl, tmp_path / "tiny-xl.safetensors")
    Image.new("RGB", (96, 64), (90, 160, 30)).save(tmp_path / "ref.png")
    out = tmp_path / "embeddings"
    assert cli.main(["train", "--image", str(tmp_path / "ref.png"), "--name", "walle", "--out", str(out),
                     "--steps", "2", "--width", "64", "--height", "64", "--ckpt", str(ckpt),
                     "--no-final-preview", "--previews", str(tmp_path / "previews")]) == 0
    assert pairfiles.load_embedding(out / "walle.pt").layout == "sdxl"
    sd1 = {"clip_l": torch.randn(2, 768)}
    pairfiles.save_pair(out / "old", "robo", sd1, sd1)  # an SD1 pair: skipped on SDXL, as the webui skips it
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", str(ckpt), "--prompt", "walle and robo", "--embeddings", str(out),
                     "--steps", "2", "--width", "64", "--height", "64", "--precision", "bf16",
                     "--output", str(tmp_path / "out.png")]) == 0
    printed = capsys.readouterr().out
    assert "negative prompt: walle-neg" in printed and "robo-neg" not in printed.split("negative prompt:")[1]
    assert re.search(r"skipped robo.*SD1 \(768-wide\).*SDXL", printed)
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_sizes_default_to_the_models_own():
    config = TrainConfig(name="walle")
    assert (config.width, config.height) == (0, 0)
    assert config.size_for(FAMILIES["sdxl"].size) == (1024, 1024)
    assert FAMILIES["sd1"].size == FAMILIES["sd2"].size == 512
    assert TrainConfig(name="walle", height=768).size_for(1024) == (1024, 768)
    with pytest.raises(InputError, match="at least 64"):
        TrainConfig(name="walle", width=32)
