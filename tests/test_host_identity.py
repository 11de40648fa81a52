"""Identity mode at generation time in the stand-in webui 1.6.0 and 1.10.1: in every row layout of its CFG denoiser
the rows whose prompt names the identity get the K variant of their call's stage as the cross-attention keys and the
V variant as the values; other rows and prompts are untouched; the hooks go after the generation, also when it
fails; the model is exactly as before."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fakehost.checks import assert_same_state, model_state

from dreamartist import identityfiles
from dreamartist.identity import IdentityTokens, K, V, stage_of

REPO = Path(__file__).resolve().parents[1]
NAME = "zqv"


def identity_tokens(model, stages: int = 5, seed: int = 0) -> IdentityTokens:
    """Random stage tokens for every text encoder of ``model`` (SDXL: clip_l and clip_g)."""
    from extensions_builtin_compat.host_backend import token_widths

    g = torch.Generator().manual_seed(seed)
    return IdentityTokens({key: torch.randn(stages, 2, width, generator=g) * 0.5
                           for key, width in token_widths(model).items()})


def with_identity(host):
    """``host`` with the extension loaded and an identity of random stage tokens for its model in the folder."""
    from extensions_builtin_compat import identities

    tokens = identity_tokens(host.shared.sd_model)
    identityfiles.save_identity(identities.identities_dir(), NAME, tokens, {}, {"kv_split": True})
    host.load_extension(REPO)
    host.tokens = tokens
    return host


@pytest.fixture
def hooked(host):
    from extensions_builtin_compat import identity_hook

    yield with_identity(host)
    identity_hook.end()


class Probe:
    """What every cross-attention projected its keys and its values from, per call, with the call's timesteps and
    (SDXL) its vector."""

    def __init__(self, model):
        from extensions_builtin_compat.host_attention import attention_layers
        from extensions_builtin_compat.host_backend import unet_of

        unet = unet_of(model)
        self.calls, self.handles = [], [unet.register_forward_pre_hook(self.unet_call, with_kwargs=True)]
        vector = getattr(unet.unet, "class_embedding", None)  # the stand-in sgm UNet's label_emb: y as the UNet got it
        if vector is not None:
            self.handles.append(vector.register_forward_pre_hook(self.vector))
        for name, module in attention_layers(unet).items():
            if name.endswith("attn2"):
                self.handles += [module.to_k.register_forward_hook(self.record("k")),
                                 module.to_v.register_forward_hook(self.record("v"))]

    def unet_call(self, module, args, kwargs):
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        self.calls.append({"t": t.clone(), "y": None, "k": [], "v": []})

    def vector(self, module, args):
        self.calls[-1]["y"] = args[0].detach().clone()

    def record(self, which):
        def hook(module, inputs, output):
            self.calls[-1][which].append(inputs[0].detach().clone())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def generate(host, **fields):
    fields = {"seed": 3, "steps": 3, **fields}
    p = host.txt2img(script_args={"dreamartist": [True, "pair", 0.8, 0.65]}, **fields)
    probe = Probe(p.sd_model)
    try:
        processed = host.process_images(p)
    finally:
        probe.close()
    return p, processed, probe


def split_rows(call) -> list[bool]:
    """Per row: did any cross-attention read its values from another context than its keys?"""
    rows = call["k"][0].shape[0]
    return [any(not torch.equal(k[r], v[r]) for k, v in zip(call["k"], call["v"])) for r in range(rows)]


@pytest.mark.parametrize("layout, options, fields, expected", [
    ("one call", {}, dict(prompt=f"a photo of {NAME}"), [[True, False]]),
    ("batch_cond_uncond off", {"batch_cond_uncond": False}, dict(prompt=NAME), [[True], [False]]),
    ("AND prompts", {}, dict(prompt=f"{NAME} AND a red cat"), [[True, False, False]]),
    ("batch of two prompts", {}, dict(prompt=[NAME, "a cat"], batch_size=2), [[True, False, False, False]]),
    ("other lengths", {}, dict(prompt=f"{NAME} " + "word " * 80), [[True], [False]]),
])
def test_only_the_rows_naming_the_identity_read_k_and_v_from_different_contexts(hooked, layout, options, fields,
                                                                                  expected):
    for key, value in options.items():
        setattr(hooked.shared.opts, key, value)
    _, processed, probe = generate(hooked, **fields)
    assert [split_rows(call) for call in probe.calls] == expected * 3  # three steps
    assert f"DreamArtist identity: {NAME}" in processed.infotexts[0]


def test_the_keys_and_values_are_the_stage_variants_of_each_calls_timestep(hooked):
    assert_stage_variants(hooked)


def assert_stage_variants(hooked) -> None:
    from extensions_builtin_compat.host_backend_sdxl import backend_for

    _, _, probe = generate(hooked, prompt=f"a photo of {NAME}", steps=4)
    backend, tokens = backend_for(), hooked.tokens
    stages = set()
    for call in probe.calls:
        s = int(stage_of(call["t"][0], 5, 1000))
        stages.add(s)
        with torch.no_grad():
            k = backend.encode([f"a photo of {NAME}"], {NAME: tokens.vectors(s, K)}).context[0]
            v = backend.encode([f"a photo of {NAME}"], {NAME: tokens.vectors(s, V)}).context[0]
        row = split_rows(call).index(True)  # the cond row (A1111 batches it first, the Forge family last)
        torch.testing.assert_close(call["k"][0][row], k)  # the first cross-attention's inputs
        torch.testing.assert_close(call["v"][0][row], v)
    assert len(stages) > 1  # the steps crossed a stage boundary


def test_prompts_without_the_identity_are_untouched_and_the_model_is_as_before(hooked):
    model = hooked.shared.sd_model
    before = model_state(model)
    _, plain, probe = generate(hooked, prompt="a red cat")
    assert all(split_rows(call) == [False, False] for call in probe.calls)
    generate(hooked, prompt=f"a photo of {NAME}")
    assert_same_state(before, model_state(model))
    unet = model.model.diffusion_model
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert not model.cond_stage_model._forward_hooks
    assert all("forward" not in m.__dict__ for m in unet.modules())
    assert NAME not in hooked.module("modules.sd_hijack").model_hijack.embedding_db.word_embeddings
    again = generate(hooked, prompt="a red cat")[1]
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))


def test_the_hires_pass_and_img2img_apply_the_identity(hooked):
    _, _, probe = generate(hooked, prompt=f"a photo of {NAME}", enable_hr=True, hr_prompt=f"a photo of {NAME}")
    assert all(split_rows(call) == [True, False] for call in probe.calls) and len(probe.calls) == 6
    from PIL import Image

    p = hooked.img2img(Image.new("RGB", (64, 64), (200, 30, 30)), prompt=f"a photo of {NAME}", steps=3,
                       script_args={"dreamartist": [True, "pair", 0.8, 0.65]})
    probe = Probe(p.sd_model)
    try:
        hooked.run_img2img(p)
    finally:
        probe.close()
    assert probe.calls and all(split_rows(call) == [True, False] for call in probe.calls)


def test_a_generation_that_fails_still_removes_its_hooks_when_closed(hooked, monkeypatch):
    from contextlib import closing

    from extensions_builtin_compat import identity_hook

    p = hooked.txt2img(prompt=f"a photo of {NAME}", steps=2, script_args={"dreamartist": [True, "pair", 0.8, 0.65]})
    processing = hooked.module("modules.processing")
    monkeypatch.setattr(type(p), "sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), closing(p):
        processing.process_images(p)
    assert identity_hook.current() is None
    unet = p.sd_model.model.diffusion_model
    assert not unet._forward_pre_hooks and all("forward" not in m.__dict__ for m in unet.modules())


def test_an_sdxl_identity_gives_its_rows_each_stages_contexts_and_the_k_prompts_pooled_output(host_v1101):
    """Both encoders' K and V variants side by side in the context, as the webui's conditioner concatenates them; the
    cond row's vector starts with CLIP-G's pooled output of the K prompt (as training conditions), its size part and
    the uncond row are left as they were; the model is exactly as before."""
    from dreamartist.backend import POOLED
    from extensions_builtin_compat import identities
    from extensions_builtin_compat.host_backend_sdxl import backend_for

    model = host_v1101.load_model("sdxl")
    tokens = identity_tokens(model)
    identityfiles.save_identity(identities.identities_dir(), NAME, tokens, {}, {"kv_split": True})
    host_v1101.load_extension(REPO)
    before = model_state(model)
    prompt = f"a photo of {NAME}"
    _, plain, plain_probe = generate(host_v1101, prompt="a photo of a cat", steps=4)
    _, processed, probe = generate(host_v1101, prompt=prompt, steps=4)
    assert f"DreamArtist identity: {NAME}" in processed.infotexts[0]
    assert [split_rows(call) for call in probe.calls] == [[True, False]] * 4
    backend, stages = backend_for(model), set()
    for call, plain_call in zip(probe.calls, plain_probe.calls):
        s = int(stage_of(call["t"][0], 5, 1000))
        stages.add(s)
        with torch.no_grad():
            k = backend.encode([prompt], {NAME: tokens.vectors(s, K)})
            v = backend.encode([prompt], {NAME: tokens.vectors(s, V)}).context[0]
        torch.testing.assert_close(call["k"][0][0], k.context[0])
        torch.testing.assert_close(call["v"][0][0], v)
        pooled = k.extras[POOLED][0]
        torch.testing.assert_close(call["y"][0, :pooled.shape[0]], pooled)
        assert torch.equal(call["y"][0, pooled.shape[0]:], plain_call["y"][0, pooled.shape[0]:])  # the sizes
        assert torch.equal(call["y"][1], plain_call["y"][1])  # the uncond row
    assert len(stages) > 1
    assert_same_state(before, model_state(model))
    unet = model.model.diffusion_model
    assert not unet._forward_pre_hooks and not model.conditioner._forward_hooks


def test_an_sdxl_hires_pass_finds_its_own_rows_by_their_vector(host_v1101):
    """The hires pass encodes the same texts at another size: the same crossattn, another vector; each pass's rows
    get the vector of their own size."""
    from extensions_builtin_compat import identities

    model = host_v1101.load_model("sdxl")
    identityfiles.save_identity(identities.identities_dir(), NAME, identity_tokens(model), {}, {"kv_split": True})
    host_v1101.load_extension(REPO)
    _, _, probe = generate(host_v1101, prompt=f"a photo of {NAME}", enable_hr=True, hr_prompt=f"a photo of {NAME}")
    _, _, plain = generate(host_v1101, prompt="a photo of a cat", enable_hr=True, hr_prompt="a photo of a cat")
    assert len(probe.calls) == 6 and all(split_rows(call) == [True, False] for call in probe.calls)
    pooled = identity_tokens(model).tokens["clip_g"].shape[-1]  # CLIP-G's width: the pooled part comes first
    sizes = [call["y"][0, pooled:] for call in probe.calls]
    assert [torch.equal(a, b["y"][0, pooled:]) for a, b in zip(sizes, plain.calls)] == [True] * 6
    assert not torch.equal(sizes[0], sizes[-1])  # the two passes' sizes differ


def test_prompt_editing_weights_and_a_pairs_negative_compose_with_the_identity(hooked):
    from fakehost.checks import write_pair

    write_pair(hooked.embeddings_dir, "walle", seed=1)
    hooked.module("modules.sd_hijack").model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    p, processed, probe = generate(hooked, prompt=f"[a photo of ({NAME}:1.3), walle:a red cat:2]", steps=4)
    # the webui's schedule: the first text through step 2 (0-based: three steps), the second after it
    assert [split_rows(call) for call in probe.calls] == [[True, False]] * 3 + [[False, False]]
    assert "walle-neg" in p.all_negative_prompts[0]
    assert f"DreamArtist identity: {NAME}" in processed.infotexts[0]


def test_an_sd2_model_gets_the_identity_through_its_openclip_encoder(host_v1101):
    from extensions_builtin_compat import identities

    model = host_v1101.load_model("sd2")
    tokens = identity_tokens(model)
    identityfiles.save_identity(identities.identities_dir(), NAME, tokens, {}, {"kv_split": True})
    host_v1101.load_extension(REPO)
    _, processed, probe = generate(host_v1101, prompt=f"a photo of {NAME}")
    assert probe.calls and all(split_rows(call) == [True, False] for call in probe.calls)


@pytest.mark.parametrize("webui, kind", [("host_reforge", "sd1"), ("host_classic", "sd1"), ("host_neo", "sd1"),
                                         ("host_neo", "sdxl")])
def test_the_forge_family_applies_the_identity_and_leaves_the_model_as_it_was(request, webui, kind):
    """reForge and Classic keep the webui's prompt encoder and model object over ldm_patched's UNet; Neo's prompts go
    through its backend's text engines (each with its own embedding database) from the model's
    get_learned_conditioning, its UNet behind its patcher. All sample inside torch.inference_mode and batch the uncond
    row first: the identity's rows get each stage's K and V all the same, the other rows nothing, and nothing of it
    is left on the model."""
    from test_host_neo import assert_same_parts, parts_state

    host = request.getfixturevalue(webui)
    model = host.load_model(kind)
    host = with_identity(host)
    from extensions_builtin_compat import identity_hook
    from extensions_builtin_compat.host import runs_forge_engine
    from extensions_builtin_compat.host_backend import unet_of

    state, same = (parts_state, assert_same_parts) if runs_forge_engine(model) else (model_state, assert_same_state)
    try:
        generate(host, prompt="a photo")  # transformers hooks its encoders at their first use
        before = state(model)
        _, processed, probe = generate(host, prompt=f"a photo of {NAME}")
        assert [sorted(split_rows(call)) for call in probe.calls] == [[False, True]] * 3  # the cond row only
        assert f"DreamArtist identity: {NAME}" in processed.infotexts[0]
        assert_stage_variants(host)
        same(before, state(model))
        assert "get_learned_conditioning" not in vars(model)
        assert all("forward" not in m.__dict__ for m in unet_of(model).modules())
    finally:
        identity_hook.end()


@pytest.mark.parametrize("webui", ["host_neo", "host_reforge"])
def test_a_row_the_forge_family_repeats_gets_the_stage_variants_in_every_copy(request, webui):
    """With a negative prompt of two chunks, the Forge family's batching repeats the identity's one-chunk row up to
    the uncond row's length: each copy of it takes the K variant."""
    host = request.getfixturevalue(webui)
    host.load_model("sd1")
    host = with_identity(host)
    from extensions_builtin_compat import identity_hook
    from extensions_builtin_compat.host_backend_sdxl import backend_for

    try:
        _, _, probe = generate(host, prompt=f"a photo of {NAME}", negative_prompt="blurry, " * 60, steps=2)
        backend = backend_for()
        for call in probe.calls:
            row = split_rows(call).index(True)
            stage = int(stage_of(call["t"][row], 5, 1000))
            with torch.no_grad():
                k = backend.encode([f"a photo of {NAME}"], {NAME: host.tokens.vectors(stage, K)}).context[0]
            assert call["k"][0].shape[1] == 2 * k.shape[0]  # one call, the cond row repeated to 154 tokens
            torch.testing.assert_close(call["k"][0][row], torch.cat([k, k]))
    finally:
        identity_hook.end()


def test_neos_infotext_notes_the_identity_once(host_neo):
    """Neo's engines note each embedding an encode splices in for the next infotext ("TI"), appending: the encodes of
    the stage variants are not noted (the real Neo's infotext would name the identity's carrier eleven times)."""
    host_neo.load_model("sd1")
    host = with_identity(host_neo)
    from backend.args import dynamic_args

    from extensions_builtin_compat import identity_hook

    try:
        generate(host, prompt=f"a photo of {NAME}")
        assert dynamic_args.last_extra_generation_params.get("TI") == NAME
    finally:
        identity_hook.end()
