"""PN adapters at generation time in the stand-in webui, for every row layout its CFG denoiser uses: phi^p on the
cond rows and phi^n on the uncond rows of the images whose prompt uses the pair, in the UNet and the text
encoder; the built-in Lora still applies beside them; the model is as before afterwards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fakehost.checks import assert_same_state, model_state, write_pair

from dreamartist import adapters, pairfiles

REPO = Path(__file__).resolve().parents[1]


def random_groups(model, seed: int) -> dict:
    """Adapters for every target layer with non-zero ``up``, so that they visibly act."""
    from extensions_builtin_compat.host_backend import layers_of

    g = torch.Generator().manual_seed(seed)
    groups = {}
    for part, layers in layers_of(model).items():
        for branch in ("pos", "neg"):
            groups[f"{part}_{branch}"] = adapters.flatten({
                name: adapters.Lora(torch.randn(2, m.in_features, generator=g) * 0.3,
                                    torch.randn(m.out_features, 2, generator=g) * 0.3, 2.0)
                for name, m in layers.items()})
    return groups


@pytest.fixture
def hooked(host):
    model = host.shared.sd_model
    write_pair(host.embeddings_dir, "walle", seed=1)
    pos, neg = pairfiles.load_pair(host.embeddings_dir, "walle")
    pairfiles.save_pair(host.embeddings_dir, "walle", pos.vectors, neg.vectors, overwrite=True,
                        adapters=random_groups(model, 3))
    host.load_extension(REPO)
    return host


class Recorder:
    """The row labels each adapter layer saw, per call: one UNet layer, one text-encoder layer."""

    def __init__(self, model):
        from extensions_builtin_compat.host_backend import layers_of

        layers = layers_of(model)
        self.unet, self.text = [], []
        self.handles = [next(iter(layers["unet"].values())).register_forward_hook(self.record(self.unet)),
                        next(iter(layers["te"].values())).register_forward_hook(self.record(self.text))]

    @staticmethod
    def record(calls):
        def hook(module, inputs, output):
            rows = adapters.current_rows()
            calls.append(None if rows is None else [sorted(x.split("@")[0] for x in row) for row in rows])
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def generate(host, mode="pair", strengths=(0.8, 0.65), **fields):
    fields = {"seed": 3, "steps": 2, **fields}
    p = host.txt2img(script_args={"dreamartist": [True, mode, *strengths]}, **fields)
    recorder = Recorder(p.sd_model)
    try:
        processed = host.process_images(p)
    finally:
        recorder.close()
    return p, processed, recorder


POS, NEG = ["walle:pos"], ["walle:neg"]


@pytest.mark.parametrize("layout, options, fields, unet_calls", [
    ("one call", {}, dict(prompt="a photo of walle"), [[POS, NEG]]),
    ("batch_cond_uncond off", {"batch_cond_uncond": False}, dict(prompt="walle"), [[POS], [NEG]]),
    ("other lengths", {}, dict(prompt="walle " + "word " * 80), [[POS], [NEG]]),
    ("AND prompts", {}, dict(prompt="walle AND a red cat"), [[POS, POS, NEG]]),
    ("batch of two prompts", {}, dict(prompt=["walle", "a cat"], batch_size=2), [[POS, [], NEG, []]]),
])
def test_each_row_gets_its_branchs_adapter_in_every_layout(hooked, layout, options, fields, unet_calls):
    for key, value in options.items():
        setattr(hooked.shared.opts, key, value)
    _, processed, seen = generate(hooked, **fields)
    assert seen.unet == unet_calls * 2  # two denoising steps
    assert "DreamArtist adapters: \"pair, 0.8, 0.65\"" in processed.infotexts[0]


def test_skipped_uncond_rows_leave_phi_n_out(hooked):
    hooked.shared.opts.s_min_uncond = 10_000  # NGMS: the uncond pass is skipped on odd steps
    _, _, seen = generate(hooked, prompt="walle", steps=2)
    assert seen.unet == [[POS, NEG], [POS]]


def test_the_hires_pass_follows_the_hires_prompt(hooked):
    _, _, seen = generate(hooked, prompt="walle", enable_hr=True, hr_prompt="a cat")
    assert seen.unet == [[POS, NEG]] * 2 + [[[], []]] * 2


def test_text_encoder_rows_pair_mode_and_da_plus_plus(hooked):
    p, _, seen = generate(hooked, prompt="a photo of walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, walle-neg"]
    assert sorted(map(str, seen.text)) == sorted(map(str, [[NEG], [POS]]))  # one call per distinct prompt
    p, processed, seen = generate(hooked, mode="DA++", prompt="a photo of walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry"]  # phi^n alone on the negative side, no S^n
    assert sorted(map(str, seen.text)) == sorted(map(str, [[NEG], [POS]]))
    assert seen.unet == [[POS, NEG]] * 2 and "DreamArtist: walle" in processed.infotexts[0]


def test_off_mode_and_prompts_without_the_pair_change_nothing(hooked):
    _, plain, _ = generate(hooked, mode="off", prompt="a photo of walle")
    _, with_adapters, seen = generate(hooked, prompt="a photo of walle")
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(with_adapters.images[0]))
    _, other, seen = generate(hooked, prompt="a photo of a cat")
    assert all(call is None for call in seen.unet + seen.text)


def test_the_builtin_lora_still_applies_and_ours_off_is_the_builtin_alone(hooked):
    from test_host_training import lora_deltas

    hooked.lora.register_network("other", lora_deltas(hooked.shared.sd_model))
    prompt = "<lora:other:0.7> walle"
    image = lambda processed: np.asarray(processed.images[0])  # noqa: E731
    off = image(generate(hooked, mode="off", prompt=prompt)[1])
    both, seen = (lambda r: (image(r[1]), r[2]))(generate(hooked, prompt=prompt))
    ours = image(generate(hooked, prompt="walle")[1])
    adapter_file = hooked.embeddings_dir / "walle.dreamartist-lora"
    adapter_file.rename(adapter_file.with_suffix(".away"))
    lora_alone = image(generate(hooked, prompt=prompt)[1])  # the same pairing, no adapters to apply
    assert np.array_equal(off, lora_alone)
    assert not np.array_equal(both, off) and not np.array_equal(both, ours)  # each acts beside the other
    assert seen.unet == [[POS, NEG]] * 2


def test_the_model_is_as_before_after_generating_with_adapters(hooked):
    model = hooked.shared.sd_model
    before = model_state(model)
    first = generate(hooked, prompt="a cat")[1].images[0]
    generate(hooked, prompt="walle")
    assert_same_state(before, model_state(model))
    assert np.array_equal(np.asarray(generate(hooked, prompt="a cat")[1].images[0]), np.asarray(first))


def test_a_generation_that_failed_in_another_request_leaves_the_next_one_its_adapters(hooked):
    """The webui runs each request in a copy of the server's context. A generation that failed inside a UNet call
    left its adapters and row labels, set in that request's context, which the next request's cannot reset (seen in
    a real webui: "Token ... was created in a different Context", and the next generation went without adapters)."""
    import contextvars

    from extensions_builtin_compat.host_backend import layers_of

    layer = next(iter(layers_of(hooked.shared.sd_model)["unet"].values()))

    def fail(module, inputs, output):
        raise RuntimeError("the UNet call failed")

    handle = layer.register_forward_hook(fail)
    p = hooked.txt2img(prompt="walle", seed=3, steps=2, script_args={"dreamartist": [True, "pair", 0.8, 0.65]})
    try:
        with pytest.raises(RuntimeError, match="UNet call failed"):
            contextvars.copy_context().run(hooked.process_images, p)
    finally:
        handle.remove()
    assert adapters.current_rows() is None  # this context never had the failed request's labels
    _, processed, seen = contextvars.copy_context().run(generate, hooked, prompt="walle")
    assert seen.unet == [[POS, NEG]] * 2 and "DreamArtist adapters" in processed.infotexts[0]
    assert hooked.module("modules.errors").reported == []
