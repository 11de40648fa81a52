"""The standalone backend: tokenizer, tiny random model, splicing of learned words, training context, checkpoints."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from dreamartist.backend import EPSILON, V_PREDICTION, Backend, Conditioning
from dreamartist.errors import InputError, ModelError
from dreamartist.standalone import build_random_backend, clip_tokenizer, load_checkpoint
from dreamartist.standalone.checkpoint import (
    CONFIG_ROOT,
    convert_weights,
    detect_family,
    empty_models,
    probe_v_prediction,
)
from dreamartist.standalone.random_model import RANDOM_TEXT_ENCODER, RANDOM_UNET, RANDOM_VAE

PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenizer_gives_the_clip_ids():
    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == PHOTO_OF_A_CAT
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_tiny_backend_is_an_sd1_backend(random_backend):
    assert isinstance(random_backend, Backend)
    assert (random_backend.family, random_backend.prediction_type) == ("sd1", EPSILON)
    assert (random_backend.model_name, random_backend.model_hash) == ("random", "random")
    assert random_backend.embedding_dims == {"clip_l": 32}
    assert (random_backend.latent_channels, random_backend.vae_scale) == (4, 8)
    assert random_backend.text_encoder.get_input_embeddings().num_embeddings == 49408


def test_alphas_cumprod_is_the_scaled_linear_schedule(random_backend):
    alphas = random_backend.alphas_cumprod
    assert alphas.shape == (1000,) and alphas.dtype == torch.float32 and alphas.device.type == "cpu"
    assert alphas[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    beta_1 = (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) / 999) ** 2
    assert alphas[1].item() == pytest.approx((1 - 0.00085) * (1 - beta_1), rel=1e-6)
    product = 1.0
    for i in range(1000):  # ldm's make_beta_schedule("linear"), computed in plain floats
        product *= 1 - (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / 999) ** 2
    assert alphas[-1].item() == pytest.approx(product, rel=1e-6)
    assert alphas[-1].item() == pytest.approx(0.00466, abs=1e-5)


def test_demo_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_random_backend(seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    second = build_random_backend(seed=3)
    for a, b in zip(first.modules, second.modules):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_word_vectors_and_eos_vector_are_token_table_rows(random_backend):
    table = random_backend.text_encoder.get_input_embeddings().weight
    words = random_backend.word_vectors("a photo of a cat")["clip_l"]
    assert words.shape == (5, 32) and not words.requires_grad
    assert torch.equal(words, table[PHOTO_OF_A_CAT[1:-1]].detach())
    eos = random_backend.eos_vector()["clip_l"]
    assert eos.shape == (32,) and torch.equal(eos, table[49407].detach())


def _embeddings_output(backend, prompts, words):
    """Encode and capture the text encoder's input rows (token embedding + position embedding)."""
    embeddings = next(m for m in backend.text_encoder.modules() if type(m).__name__ == "CLIPTextEmbeddings")
    captured = []
    handle = embeddings.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        cond = backend.encode(prompts, words, branches=("pos",) * len(prompts))
    finally:
        handle.remove()
    positions = embeddings.position_embedding.weight.detach()  # (77, dim)
    return cond, torch.cat([rows - positions for rows in captured], dim=1)  # one call per 77-token chunk


def test_encode_splices_vectors_at_the_word(random_backend):
    table = random_backend.text_encoder.get_input_embeddings().weight.detach()
    pos, neg = torch.randn(3, 32), torch.randn(2, 32)
    words = {"walle": {"clip_l": pos}, "walle-neg": {"clip_l": neg}}
    cond, rows = _embeddings_output(random_backend, ["a photo of walle", "walle-neg, Walle"], words)
    assert isinstance(cond, Conditioning) and cond.context.shape == (2, 77, 32) and cond.branches == ("pos", "pos")
    atol = 1e-6
    # Row 0: BOS, "a photo of", walle's 3 vectors, EOS, EOS padding.
    assert torch.allclose(rows[0, 1:4], table[[320, 1125, 539]], atol=atol)
    assert torch.allclose(rows[0, 4:7], pos, atol=atol)
    assert torch.allclose(rows[0, 7:], table[49407].expand(70, 32), atol=atol)
    # Row 1: walle-neg is matched as itself (longest name first), then ",", then walle (case-insensitive).
    assert torch.allclose(rows[1, 1:3], neg, atol=atol)
    assert torch.allclose(rows[1, 3], table[267], atol=atol)
    assert torch.allclose(rows[1, 4:7], pos, atol=atol)


def test_encode_without_words_matches_plain_clip(random_backend):
    ids = torch.tensor([PHOTO_OF_A_CAT + [49407] * 70])
    expected = random_backend.text_encoder(input_ids=ids).last_hidden_state
    assert torch.equal(random_backend.encode(["a photo of a cat"]).context, expected)


def test_a_word_that_is_part_of_another_word_is_not_spliced(random_backend):
    vector = torch.randn(1, 32)
    plain = random_backend.encode(["wallet"]).context
    assert torch.equal(random_backend.encode(["wallet"], {"walle": {"clip_l": vector}}).context, plain)


def test_a_word_that_does_not_fit_its_chunk_starts_the_next_one(random_backend):
    """As in the webui: never cut; the prompt grows by another 77-token chunk."""
    vectors = torch.randn(4, 32)
    table = random_backend.text_encoder.get_input_embeddings().weight.detach()
    cond, rows = _embeddings_output(random_backend, ["a " * 73 + "walle"], {"walle": {"clip_l": vectors}})
    assert cond.context.shape == (1, 154, 32)
    assert torch.allclose(rows[0, 1:74], table[320].expand(73, 32), atol=1e-6)
    assert torch.allclose(rows[0, 74:77], table[49407].expand(3, 32), atol=1e-6)  # EOS padding, then EOS
    assert torch.allclose(rows[0, 77], table[49406], atol=1e-6)  # BOS of the second chunk
    assert torch.allclose(rows[0, 78:82], vectors, atol=1e-6)


def test_a_full_chunk_breaks_after_its_last_comma(random_backend):
    table = random_backend.text_encoder.get_input_embeddings().weight.detach()
    _, rows = _embeddings_output(random_backend, ["a " * 70 + ", " + "photo " * 10], {})
    assert torch.allclose(rows[0, 71], table[267], atol=1e-6)  # the comma ends the first chunk
    assert torch.allclose(rows[0, 72:77], table[49407].expand(5, 32), atol=1e-6)
    assert torch.allclose(rows[0, 78:88], table[1125].expand(10, 32), atol=1e-6)  # all ten "photo" moved on


def test_prompts_of_different_lengths_are_padded_with_empty_chunks(random_backend):
    long, short = random_backend.encode(["a " * 80, "a photo of a cat"]).context
    assert long.shape == short.shape == (154, 32)
    torch.testing.assert_close(short[77:], random_backend.encode([""]).context[0])


def test_attention_weights_scale_the_context_and_keep_its_mean(random_backend):
    plain = random_backend.encode(["a photo of a cat"]).context
    weighted = random_backend.encode(["a photo of a (cat:1.5)"]).context
    z = plain * torch.tensor([1.0] * 5 + [1.5] + [1.0] * 71).view(1, 77, 1)
    torch.testing.assert_close(weighted, z * (plain.mean() / z.mean()))


def test_gradient_reaches_only_the_word_vectors(random_backend):
    pos = torch.randn(3, 32, requires_grad=True)
    unused = torch.randn(2, 32, requires_grad=True)
    with random_backend.training():
        cond = random_backend.encode(["a photo of walle"], {"walle": {"clip_l": pos}, "other": {"clip_l": unused}})
        random_backend.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond).square().mean().backward()
    assert pos.grad is not None and pos.grad.abs().sum() > 0
    assert unused.grad is None
    assert all(p.grad is None for m in random_backend.modules for p in m.parameters())
    assert not random_backend.text_encoder.get_input_embeddings()._forward_hooks


def test_encode_rejects_vectors_of_the_wrong_encoder_or_width(random_backend):
    with pytest.raises(InputError, match="clip_l"):
        random_backend.encode(["walle"], {"walle": {"clip_h": torch.zeros(1, 32)}})
    with pytest.raises(InputError, match=re.escape("(n, 32)")):
        random_backend.encode(["walle"], {"walle": {"clip_l": torch.zeros(1, 768)}})


def test_unet_and_vae_shapes_and_gradients(random_backend):
    cond = random_backend.encode(["a", "b"])
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = random_backend.unet(latents, torch.tensor([1, 999]), cond)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32
    out.sum().backward()
    assert latents.grad is not None

    pixels = torch.rand(1, 3, 64, 64, requires_grad=True) * 2 - 1
    encoded = random_backend.vae_encode(pixels)
    assert encoded.shape == (1, 4, 8, 8) and encoded.dtype == torch.float32 and not encoded.requires_grad
    posterior_mean = random_backend.vae_model.encode(pixels.detach()).latent_dist.mean
    assert torch.allclose(encoded, posterior_mean * 0.18215)

    latents = encoded.clone().requires_grad_()
    decoded = random_backend.vae_decode(latents)
    assert decoded.shape == (1, 3, 64, 64) and decoded.dtype == torch.float32
    decoded.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def _model_state(backend):
    params = [(n, p.requires_grad) for m in backend.modules for n, p in m.named_parameters()]
    modes = [(n, m.training) for root in backend.modules for n, m in root.named_modules()]
    weights = [t.clone() for m in backend.modules for t in m.state_dict().values()]
    switches = [m.gradient_checkpointing for m in backend.unet_model.modules()
                if hasattr(m, "gradient_checkpointing")]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for root in backend.modules for m in root.modules()]
    return params, modes, weights, switches, hooks


def _assert_same_state(before, after):
    assert before[0] == after[0] and before[1] == after[1] and before[3] == after[3] and before[4] == after[4]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_context_restores_the_model_exactly(checkpointing):
    backend = build_random_backend(seed=1)
    # An unusual starting state, so restoring "frozen + eval" by default would not pass.
    backend.unet_model.conv_in.weight.requires_grad_(True)
    backend.text_encoder.train()
    before = _model_state(backend)
    vector = torch.randn(1, 32, requires_grad=True)
    with backend.training(gradient_checkpointing=checkpointing):
        assert not any(p.requires_grad for m in backend.modules for p in m.parameters())
        assert not any(m.training for root in backend.modules for m in root.modules())
        assert backend.unet_model.is_gradient_checkpointing == checkpointing
        cond = backend.encode(["walle"], {"walle": {"clip_l": vector}})
        backend.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond).sum().backward()
    _assert_same_state(before, _model_state(backend))

    with pytest.raises(RuntimeError, match="boom"):
        with backend.training(gradient_checkpointing=not checkpointing):
            raise RuntimeError("boom")
    _assert_same_state(before, _model_state(backend))


def test_gradient_checkpointing_gives_the_same_gradient(random_backend):
    grads = []
    latents = torch.randn(1, 4, 8, 8)
    for checkpointing in (False, True):
        vector = torch.ones(2, 32, requires_grad=True)
        with random_backend.training(gradient_checkpointing=checkpointing):
            cond = random_backend.encode(["walle"], {"walle": {"clip_l": vector}})
            random_backend.unet(latents, torch.tensor([300]), cond).square().sum().backward()
        grads.append(vector.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def _resnet_to_ldm(rest: str) -> str:
    names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
             "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    head, _, tail = rest.partition(".")
    return f"{names[head]}.{tail}"


def _block_to_ldm(kind: str, rest: str) -> str:
    return f"0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"1.{rest}"


def _unet_key_to_ldm(key: str, config: dict) -> str:
    """Diffusers UNet key -> the original ldm layout (the inverse of diffusers' single-file conversion)."""
    per_level = config["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    prefix, _, leaf = key.rpartition(".")
    if prefix in fixed:
        return f"{fixed[prefix]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + level * per_level + j
        return f"input_blocks.{index}.{_block_to_ldm(kind, rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_to_ldm(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = level * per_level + j
        return f"output_blocks.{index}.{_block_to_ldm(kind, rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise AssertionError(f"unmapped UNet key {key}")


def _vae_key_to_ldm(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
    return key


def _openclip_to_ldm(text_state: dict) -> dict:
    """CLIPTextModel weights -> the OpenCLIP layout SD2 files use (fused q/k/v, resblocks)."""
    out = {}
    state = {k.removeprefix("text_model."): v for k, v in text_state.items() if not k.endswith("position_ids")}
    for key, value in state.items():
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if m[2] == "q":
                fused = [state[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(fused)
            continue
        key = re.sub(r"encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1.", key)
        for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("final_layer_norm", "ln_final"),
                         ("embeddings.token_embedding", "token_embedding")):
            key = key.replace(new, old)
        out["positional_embedding" if key == "embeddings.position_embedding.weight" else key] = value
    return out


def _vae_to_ldm(vae) -> dict:
    """The VAE's weights as single-file checkpoints hold them (``first_stage_model.`` in ldm's layout)."""
    levels, sd = len(vae.config.block_out_channels), {}
    for key, value in vae.state_dict().items():
        if "mid_block.attentions" in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # ldm keeps these as 1x1 convolutions
        sd["first_stage_model." + _vae_key_to_ldm(key, levels)] = value
    return sd


def _ldm_state_dict(backend, unet_config: dict, extra_openclip_layer: bool = False) -> dict:
    """A webui-style single-file state dict of ``backend``'s three models."""
    unet_state = backend.unet_model.state_dict()
    sd = {"model.diffusion_model." + _unet_key_to_ldm(k, unet_config): v for k, v in unet_state.items()}
    sd.update(_vae_to_ldm(backend.vae_model))
    text_state = backend.text_encoder.state_dict()
    if backend.family == "sd1":
        for key, value in text_state.items():
            sd["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    else:
        openclip = _openclip_to_ldm(text_state)
        if extra_openclip_layer:  # SD2 files hold the 24th layer that the webui skips
            last = max(int(k.split(".")[2]) for k in openclip if k.startswith("transformer.resblocks."))
            for key in [k for k in openclip if k.startswith(f"transformer.resblocks.{last}.")]:
                openclip[key.replace(f".{last}.", f".{last + 1}.")] = torch.randn_like(openclip[key])
        width = openclip["token_embedding.weight"].shape[1]
        openclip["text_projection"] = torch.randn(width, width // 2)
        sd.update({"cond_stage_model.model." + k: v for k, v in openclip.items()})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _write_configs(folder, unet: dict, text_encoder: dict):
    scheduler = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    for part, config in (("unet", unet), ("vae", RANDOM_VAE), ("text_encoder", text_encoder), ("scheduler", scheduler)):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    return folder


def _sd2_parts(seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamartist.standalone.backend import StandaloneBackend, scaled_linear_alphas_cumprod

    unet_config = dict(RANDOM_UNET, use_linear_projection=True, attention_head_dim=[4, 8], upcast_attention=True)
    text_config = dict(RANDOM_TEXT_ENCODER, hidden_act="gelu")
    torch.manual_seed(seed)
    backend = StandaloneBackend(
        family="sd2", unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**RANDOM_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)), tokenizer=clip_tokenizer(),
        alphas_cumprod=scaled_linear_alphas_cumprod(), device="cpu", dtype=torch.float32)
    return backend, unet_config, text_config


def _assert_same_weights(a, b):
    for left, right in zip(a.modules, b.modules):
        left_state, right_state = left.state_dict(), right.state_dict()
        assert left_state.keys() == right_state.keys()
        assert all(torch.equal(left_state[k], right_state[k]) for k in left_state), type(left).__name__


def test_sd1_safetensors_round_trip(random_backend, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny-sd1.safetensors"
    state_dict = _ldm_state_dict(random_backend, RANDOM_UNET)
    # Some merged checkpoints carry damaged position ids; the loader rebuilds them.
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] * 0.999
    save_file(state_dict, str(path))
    configs = _write_configs(tmp_path / "configs", RANDOM_UNET, RANDOM_TEXT_ENCODER)
    loaded = load_checkpoint(path, config_dir=configs, device="cpu")
    assert (loaded.family, loaded.prediction_type, loaded.model_name) == ("sd1", EPSILON, "tiny-sd1")
    assert re.fullmatch(r"[0-9a-f]{10}", loaded.model_hash)
    assert loaded.embedding_dims == {"clip_l": 32}
    _assert_same_weights(random_backend, loaded)
    positions = next(b for n, b in loaded.text_encoder.named_buffers() if n.endswith("position_ids"))
    assert positions.dtype == torch.long and positions.tolist() == [list(range(77))]
    assert torch.equal(loaded.alphas_cumprod, random_backend.alphas_cumprod)
    assert torch.equal(loaded.encode(["a photo of a cat"]).context, random_backend.encode(["a photo of a cat"]).context)


def _lightning_callback_class(monkeypatch):
    """A class pickled under PyTorch Lightning's ModelCheckpoint name, as the original SD .ckpt files hold one."""
    import types

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = [types.ModuleType(name) for name in names]
    for name, module in zip(names, modules):
        monkeypatch.setitem(sys.modules, name, module)
    callback = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[-1].ModelCheckpoint = callback
    instance = callback()
    instance.best_model_path = "logs/last.ckpt"
    return callback, instance


def test_sd2_ckpt_round_trip_skips_the_last_openclip_layer(tmp_path, monkeypatch):
    original, unet_config, text_config = _sd2_parts()
    path = tmp_path / "tiny-sd2.ckpt"
    state_dict = _ldm_state_dict(original, unet_config, extra_openclip_layer=True)
    callback, instance = _lightning_callback_class(monkeypatch)
    torch.save({"state_dict": state_dict, "global_step": 7, "callbacks": {callback: {"monitor": None}},
                "checkpoint_callback": instance}, path)
    configs = _write_configs(tmp_path / "configs", unet_config, text_config)
    (tmp_path / "tiny-sd2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    loaded = load_checkpoint(path, config_dir=configs, device="cpu")
    assert (loaded.family, loaded.prediction_type) == ("sd2", V_PREDICTION)
    assert loaded.embedding_dims == {"clip_h": 32}
    _assert_same_weights(original, loaded)
    # SD2 pads with token 0 ("!") like OpenCLIP, not with EOS.
    ids = torch.tensor([PHOTO_OF_A_CAT + [0] * 70])
    expected = original.text_encoder(input_ids=ids).last_hidden_state
    assert torch.equal(loaded.encode(["a photo of a cat"]).context, expected)
    assert load_checkpoint(path, config_dir=configs, prediction_type=EPSILON).prediction_type == EPSILON


# Parameter counts of the published models (SD2's text encoder: OpenCLIP-H without its last layer), and key
# names as they appear in the original single-file checkpoints.
REAL_LAYOUTS = {
    "sd1": dict(params=(859_520_964, 83_653_863, 123_060_480), keys={
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }),
    "sd2": dict(params=(865_910_724, 83_653_863, 340_387_840), keys={
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
        "cond_stage_model.model.positional_embedding": (77, 1024),
    }),
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_shipped_configs_convert_the_original_layout(family):
    """The shipped configs build the published architectures, and a full-size file of the original layout maps
    onto every weight (checked on the meta device: shapes only, no memory)."""
    unet, vae, text_encoder = empty_models(CONFIG_ROOT / family)
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder))
    expected = REAL_LAYOUTS[family]
    assert counts == expected["params"]
    meta = type("Meta", (), {"family": family, "unet_model": unet, "vae_model": vae, "text_encoder": text_encoder})
    original = _ldm_state_dict(meta, dict(unet.config), extra_openclip_layer=True)
    for key, shape in expected["keys"].items():
        assert tuple(original[key].shape) == shape, key
    assert detect_family(original) == family
    for model, weights in zip((unet, vae, text_encoder), convert_weights(original, family, unet, vae, text_encoder)):
        wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(weights[k].shape) for k in wanted if k in weights} == wanted


@pytest.mark.parametrize("offset, expected", [(-2.0, True), (0.0, False)])
def test_v_prediction_probe(offset, expected):
    class Probe:
        latent_channels = 4
        unet_model = type("Unet", (), {"config": type("Config", (), {"cross_attention_dim": 8})})()

        def unet(self, latents, timesteps, cond):
            assert timesteps.tolist() == [999] and cond.context.shape[-1] == 8
            return latents + offset

    assert probe_v_prediction(Probe()) is expected


def test_family_detection():
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    clip_l = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert detect_family({**unet, clip_l: torch.zeros(1)}) == "sd1"
    assert detect_family({**unet, "cond_stage_model.model.ln_final.weight": torch.zeros(1)}) == "sd2"
    with pytest.raises(ModelError, match="no OpenCLIP-G text encoder"):
        detect_family({**unet, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(1)})
    with pytest.raises(ModelError, match="no UNet"):
        detect_family({"cond_stage_model.model.ln_final.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="9 input channels"):
        detect_family({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)})
    with pytest.raises(ModelError, match="no text encoder"):
        detect_family(unet)


def test_an_incomplete_sdxl_file_is_a_model_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, str(path))
    with pytest.raises(ModelError, match="SDXL"):
        load_checkpoint(path)


class NotATensor:
    """A pickled object that weights_only loading must refuse."""


@pytest.mark.parametrize("name, content, message", [
    ("missing.safetensors", None, "does not exist"),
    ("garbage.safetensors", b"\x00not a safetensors file" * 10, "not a readable checkpoint"),
    ("garbage.ckpt", b"PK\x03\x04 definitely not a zip" * 10, "not a readable checkpoint"),
    ("empty.ckpt", b"", "not a readable checkpoint"),
])
def test_unreadable_files_are_model_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        load_checkpoint(path)


def test_pickles_with_objects_and_non_state_dicts_are_refused(tmp_path):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, unsafe)
    with pytest.raises(ModelError, match="Python objects besides tensors"):
        load_checkpoint(unsafe)
    listing = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ModelError, match="does not hold a Stable Diffusion state dict"):
        load_checkpoint(listing)
    other = tmp_path / "other.ckpt"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(ModelError, match="not a Stable Diffusion 1.x, 2.x or SDXL checkpoint"):
        load_checkpoint(other)
