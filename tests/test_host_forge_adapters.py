"""PN adapters in the Forge family on the stand-in host (Neo's own backend, reForge's and Forge Classic's webui model
over ldm_patched): trained on the model the webui holds, and at generation phi^p on the cond rows and phi^n on the
uncond rows of every UNet call of the family's sampler, which batches whole chunks (one row per image, cond or
uncond as its transformer_options' ``cond_or_uncond`` says, in reverse order), and on the text-encoder rows of the
prompts that use the pair; the model as before afterwards. What the real hosts showed: tests/real_webui."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fakehost.checks import write_pair
from test_host_adapters import NEG, POS, Recorder, random_groups
from test_host_neo import assert_same_parts, parts_state
from test_host_reforge import config

from dreamartist import pairfiles

REPO = Path(__file__).resolve().parents[1]
FORGE_HOSTS = ["host_neo", "host_reforge", "host_classic"]


@pytest.fixture(params=FORGE_HOSTS)
def forge(request):
    """A Forge-family host with the extension, an SD1 model and the pair "walle" with visible adapters (Neo's text
    engines read the folder when the model loads, so it loads again after the pair is written)."""
    host = request.getfixturevalue(request.param)
    write_pair(host.embeddings_dir, "walle", seed=1)
    pos, neg = pairfiles.load_pair(host.embeddings_dir, "walle")
    pairfiles.save_pair(host.embeddings_dir, "walle", pos.vectors, neg.vectors, overwrite=True,
                        adapters=random_groups(host.load_model("sd1"), 3))
    host.load_model("sd1")
    host.load_extension(REPO)
    return host


def generate(host, mode="pair", **fields):
    fields = {"seed": 3, "steps": 2, **fields}
    p = host.txt2img(script_args={"dreamartist": [True, mode, 0.8, 0.65]}, **fields)
    recorder = Recorder(host.shared.sd_model)
    try:
        processed = host.process_images(p)
    finally:
        recorder.close()
    return p, processed, recorder


@pytest.mark.parametrize("fields, unet_calls", [
    (dict(prompt="a photo of walle"), [[NEG, POS]]),  # one call, the uncond chunk first
    (dict(prompt="walle " + "word " * 80), [[NEG, POS]]),  # other lengths: one call, the shorter one repeated
    (dict(prompt="walle AND a red cat"), [[NEG, POS, POS]]),  # a cond chunk per AND sub-prompt
    (dict(prompt=["walle", "a cat"], batch_size=2), [[NEG, [], POS, []]]),  # a row per image in each chunk
], ids=["one call", "other lengths", "AND prompts", "batch of two prompts"])
def test_each_row_gets_its_branchs_adapter_in_the_forge_sampler(forge, fields, unet_calls):
    _, processed, seen = generate(forge, **fields)
    assert seen.unet == unet_calls * 2  # two denoising steps
    assert "DreamArtist adapters: \"pair, 0.8, 0.65\"" in processed.infotexts[0]


def test_the_hires_pass_follows_the_hires_prompt(forge):
    _, _, seen = generate(forge, prompt="walle", enable_hr=True, hr_prompt="a cat")
    assert seen.unet == [[NEG, POS]] * 2 + [[[], []]] * 2


def test_text_encoder_rows_pair_mode_and_da_plus_plus(forge):
    """Neo's engines hand their transformer token ids, not prompts: the rows are still told apart."""
    p, _, seen = generate(forge, prompt="a photo of walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, walle-neg"]
    assert sorted(map(str, seen.text)) == sorted(map(str, [[NEG], [POS]]))
    p, _, seen = generate(forge, mode="DA++", prompt="a photo of walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry"] and sorted(map(str, seen.text)) == sorted(map(str, [[NEG], [POS]]))


def test_the_adapters_change_the_image_and_leave_the_model_as_it_was(forge):
    model = forge.shared.sd_model
    image = lambda processed: np.asarray(processed.images[0])  # noqa: E731
    plain = image(generate(forge, mode="off", prompt="a photo of walle")[1])  # transformers hooks in at first
    before = parts_state(model) if hasattr(model, "text_processing_engine") else None
    with_adapters = image(generate(forge, prompt="a photo of walle")[1])
    other, seen = (lambda r: (image(r[1]), r[2]))(generate(forge, prompt="a photo of a cat"))
    assert not np.array_equal(plain, with_adapters)
    assert all(call is None for call in seen.unet + seen.text)
    assert np.array_equal(image(generate(forge, mode="off", prompt="a photo of walle")[1]), plain)
    assert "get_learned_conditioning" not in vars(model)  # the prompt watch is gone
    if before is not None:
        assert_same_parts(before, parts_state(model))
    assert np.array_equal(image(generate(forge, prompt="a photo of a cat")[1]), other)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient checkpointing"])
def test_adapters_train_on_the_model_the_webui_holds(forge, references, checkpointing):
    """The Forge family trains PN adapters as A1111 does: both groups written, each changed by the steps. Neo adds
    residuals in place onto the adapters' feed-forward output and onto a checkpointed block's own input (each
    failed a real Neo's backward pass)."""
    from extensions_builtin_compat import jobs

    result = jobs.run_training(config(name="eve", adapters=True, unet_lr_pos=0.01, unet_lr_neg=0.01, text_lr=0.01,
                                      reconstruction=False, gradient_checkpointing=checkpointing), references)
    assert result.step == 2 and (forge.embeddings_dir / "eve.dreamartist-lora").is_file()
    groups = pairfiles.load_adapters(forge.embeddings_dir, "eve")
    assert {"unet_pos", "unet_neg", "te_pos", "te_neg"} <= set(groups)
    for group in ("unet_pos", "unet_neg", "te_pos"):  # up starts at zero: the steps moved each
        ups = [t for name, t in groups[group].items() if name.endswith(".lora_up")]
        assert ups and any(torch.count_nonzero(t) for t in ups), group


@pytest.mark.parametrize("forge_host", FORGE_HOSTS)
def test_sdxl_pairs_apply_their_adapters_per_branch(request, forge_host):
    host = request.getfixturevalue(forge_host)
    model = host.load_model("sdxl")
    generator = torch.Generator().manual_seed(1)
    pos = {key: torch.randn(2, layer.weight.shape[1], generator=generator) * 0.02 for key, layer in
           (("clip_l", _token_layer(model, "clip_l")), ("clip_g", _token_layer(model, "clip_g")))}
    pairfiles.save_pair(host.embeddings_dir, "walle", pos, {k: -v for k, v in pos.items()},
                        adapters=random_groups(model, 3))
    host.load_model("sdxl")
    host.load_extension(REPO)
    p, processed, seen = generate(host, prompt="a photo of walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, walle-neg"]
    assert seen.unet == [[NEG, POS]] * 2 and sorted(map(str, seen.text)) == sorted(map(str, [[NEG], [POS]]))


def _token_layer(model, key: str) -> torch.nn.Module:
    """The token table of one SDXL text encoder (the webui's embedder or Neo's engine)."""
    from extensions_builtin_compat.host_backend import text_encoders

    encoder = text_encoders(model)[key]
    return next(m for m in encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight.shape[0] > 1000)
