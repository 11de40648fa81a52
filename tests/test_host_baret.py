"""BARET in the stand-in webui 1.6.0 and 1.10.1: attention control on the webui's ldm UNet under its cross-attention
optimisations (a pass-through changes nothing, an injection changes exactly what it names, nothing is left behind),
and the img2img script "BARET edit" (an edit with its infotext, pairs, Interrupt, the inversion cache, bad input,
the model as before)."""
from __future__ import annotations

import re

import gradio as gr
import pytest
import torch
from fakehost.checks import assert_same_state, class_forwards, listing, model_state, write_pair
from PIL import Image, ImageDraw
from tabhelpers import load_extension

from dreamartist.attention_control import CROSS, SELF, Controller, Injection, RowInjection, controlled

OPTIMISATIONS = ["None", "sdp", "Doggettx"]  # the stand-in's: none (the plain class forward), SDP, split attention
ROWS = ("a", "b", "c")
FAST = dict(ttis_iterations=1)  # each test's edits: 3 DDIM steps at 64 px (the stand-in's defaults)


def one_sentence(text: str) -> bool:
    return "\n" not in text and text.strip() == text and text[-1:] in ".!?" and \
        not re.search(r"[.!?]['\")]?\s+[A-Z]", text)


def optimised(host, option: str):
    """The loaded SD1 stand-in with the webui's cross-attention optimisation ``option`` applied."""
    from modules.sd_hijack import model_hijack

    model = host.shared.sd_model
    model_hijack.apply_optimizations(option)
    assert model_hijack.optimization_method == ("" if option == "None" else option)
    return model


def attention_modules(model) -> list:
    from ldm.models import CrossAttention

    return [m for m in model.model.diffusion_model.modules() if isinstance(m, CrossAttention)]


def unet_inputs(backend):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    return latents, torch.full((3,), 500), backend.encode(["a red cube", "a blue ball", "a green tree"])


class Probe(Controller):
    def __init__(self, probabilities: bool = False):
        self.sites, self.explicit = [], probabilities

    def keys_values(self, site, query, key, value):
        self.sites.append(site)
        return key, value

    def wants_probabilities(self, site):
        return self.explicit


# -- attention control on the webui's UNet ------------------------------------------------------------------------
@pytest.mark.parametrize("option", OPTIMISATIONS)
@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "probabilities"])
def test_a_pass_through_changes_nothing_under_each_optimisation_and_leaves_nothing_behind(host, option, explicit):
    from extensions_builtin_compat.host_backend import HostBackend

    model = optimised(host, option)
    backend = HostBackend()
    latents, t, cond = unet_inputs(backend)
    before, forwards = model_state(model), class_forwards()
    probe = Probe(explicit)
    with torch.no_grad():
        plain = backend.unet(latents, t, cond)
        with controlled(backend, probe) as calls, calls.at(0, ROWS):
            watched = backend.unet(latents, t, cond)
    torch.testing.assert_close(watched, plain, atol=1e-5, rtol=1e-5)
    modules = attention_modules(model)
    assert len(probe.sites) == len(modules) == 8  # every attn1 and attn2 went through the controller, once
    assert {(site.kind, site.step, site.rows) for site in probe.sites} == {(SELF, 0, ROWS), (CROSS, 0, ROWS)}
    assert {site.level for site in probe.sites} == {0, 1}  # the latent grid and the middle block's half
    assert not [m for m in modules if "forward" in m.__dict__]
    assert class_forwards() == forwards  # the optimisation's class forward untouched
    assert_same_state(before, model_state(model))


class ChangeProbe(RowInjection):
    """Records which rows each call's K/V or probabilities had replaced."""

    def __init__(self, injections):
        super().__init__(injections)
        self.changed: dict[tuple, set] = {}

    def _record(self, site, before, after):
        rows = {site.rows[i] for i in range(before.shape[0]) if not torch.equal(before[i], after[i])}
        if rows:
            self.changed.setdefault((site.layer.split(".attentions")[0], site.kind, site.step), set()).update(rows)

    def keys_values(self, site, query, key, value):
        new_key, new_value = super().keys_values(site, query, key, value)
        self._record(site, key, new_key)
        return new_key, new_value

    def probabilities(self, site, probs):
        new = super().probabilities(site, probs)
        self._record(site, probs, new)
        return new


@pytest.mark.parametrize("option", ["sdp", "Doggettx"])
def test_an_injection_replaces_exactly_the_rows_layers_and_steps_it_names(host, option):
    from extensions_builtin_compat.host_backend import HostBackend

    optimised(host, option)
    backend = HostBackend()
    latents, t, cond = unet_inputs(backend)
    decoder = lambda site: site.layer.startswith("up_blocks.")  # noqa: E731
    probe = ChangeProbe([Injection(SELF, (("c", "a"),), range(1, 2), decoder),
                         Injection(CROSS, (("b", "a"),), range(0, 1))])
    with torch.no_grad():
        plain = backend.unet(latents, t, cond)
        outputs = []
        with controlled(backend, probe) as calls:
            for step in range(3):
                with calls.at(step, ROWS):
                    outputs.append(backend.unet(latents, t, cond))
    assert probe.changed == {("up_blocks.1", SELF, 1): {"c"}, ("down_blocks.0", CROSS, 0): {"b"},
                             ("mid_block", CROSS, 0): {"b"}, ("up_blocks.1", CROSS, 0): {"b"}}
    same = lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
    assert same(outputs[0][0], plain[0]) and same(outputs[0][2], plain[2])
    assert not same(outputs[0][1], plain[1])  # b took a's cross-attention map at step 0
    assert same(outputs[1][:2], plain[:2]) and not same(outputs[1][2], plain[2])
    assert same(outputs[2], plain)  # no injection at step 2


def test_the_control_is_removed_when_the_block_ends_in_an_error(host):
    from extensions_builtin_compat.host_backend import HostBackend

    model = optimised(host, "sdp")
    backend = HostBackend()
    before, forwards = model_state(model), class_forwards()
    with pytest.raises(RuntimeError, match="stop"), controlled(backend, Probe()):
        assert all("forward" in m.__dict__ for m in attention_modules(model))
        raise RuntimeError("stop")
    assert not [m for m in attention_modules(model) if "forward" in m.__dict__]
    assert class_forwards() == forwards
    assert_same_state(before, model_state(model))


# -- the img2img script -------------------------------------------------------------------------------------------
@pytest.fixture
def photo():
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    return image


@pytest.fixture
def scripted(host):
    load_extension(host)
    return host


def knob_args(**changes) -> list:
    from extensions_builtin_compat import baret_script

    values = {f.name: f.default for f in baret_script.KNOBS} | {"branches": False} | changes
    return [values[f.name] for f in baret_script.KNOBS] + [values["branches"]]


def img2img(host, image, prompt="a green disc", negative="", steps=3, **knobs):
    from extensions_builtin_compat import baret_script

    fields = {k: knobs.pop(k) for k in ("width", "height", "batch_size", "n_iter", "mask", "cfg_scale")
              if k in knobs}
    return host.img2img(image, script=baret_script.TITLE, prompt=prompt, negative_prompt=negative, steps=steps,
                        script_args={"baret edit": knob_args(**(FAST | knobs))}, **fields)


class UNetCalls:
    """Counts calls of the loaded model's UNet (a forward pre-hook, removed by ``remove``)."""

    def __init__(self, model, unet=None):
        self.count = 0
        self.handle = (unet or model.model.diffusion_model).register_forward_pre_hook(self.seen)

    def seen(self, *args):
        self.count += 1

    def remove(self):
        self.handle.remove()


def test_the_script_is_listed_in_img2img_only(scripted):
    from modules import scripts

    assert [s.title() for s in scripts.scripts_img2img.selectable_scripts] == ["BARET edit"]
    assert not scripts.scripts_txt2img.selectable_scripts


def test_an_edit_returns_the_image_and_its_branches_with_every_setting_in_the_infotext(scripted, photo):
    from modules import scripts
    from modules.generation_parameters_copypaste import parse_generation_parameters, paste_values

    from extensions_builtin_compat import baret_script

    changed = dict(alpha_start=0.7, alpha_end=0.2, tau_sa=0.4, ca_layers="decoder", ttis_lr=0.002, branches=True)
    p = img2img(scripted, photo, "a green disc", "blurry", cfg_scale=5.0, **changed)
    processed = scripted.run_img2img(p)
    assert len(processed.images) == 3 and len(processed.infotexts) == 3
    assert all(image.size == (64, 64) for image in processed.images)
    edited, reconstruction, transition = (torch.tensor(list(image.getdata()), dtype=torch.float32)
                                          for image in processed.images)
    assert not torch.equal(edited, reconstruction) and not torch.equal(reconstruction, transition)
    params = parse_generation_parameters(processed.infotexts[0])
    assert (params["Prompt"], params["Negative prompt"]) == ("a green disc", "blurry")
    assert (params["Steps"], params["CFG scale"], params["Sampler"], params["Script"]) == ("3", "5.0", "DDIM",
                                                                                          "BARET edit")
    expected = {f.name: f.default for f in baret_script.KNOBS} | FAST | changed
    assert {key: params[key] for key in baret_script.INFOTEXT_KEYS.values()} == \
        {baret_script.INFOTEXT_KEYS[name]: str(value) for name, value in expected.items()}
    assert processed.images[0].info["parameters"] == processed.infotexts[0]
    saved = listing(scripted.root / "outputs")
    assert len(saved) == 4 and sum(name.endswith(("-reconstruction.png", "-transition.png")) for name in saved) == 2
    # pasting the infotext into the img2img UI sets every control back
    (script,) = scripts.scripts_img2img.selectable_scripts
    with gr.Blocks():
        controls = script.ui(True)
    assert [component for component, _ in script.infotext_fields] == controls
    assert [control.value for control in controls] == knob_args()  # the paper's defaults
    updates = paste_values(processed.infotexts[0], script.infotext_fields)
    restored = [update["value"] for update in updates]
    assert restored == knob_args(**(FAST | changed))


def test_a_pair_in_the_target_brings_its_partner_to_the_negative_text_of_the_edit(scripted, photo, monkeypatch):
    from extensions_builtin_compat import baret_script

    write_pair(scripted.embeddings_dir, "walle", seed=1)
    used = []
    real_edit = baret_script.edit

    def recording(backend, latents, config, **kwargs):
        used.append(config)
        return real_edit(backend, latents, config, **kwargs)

    monkeypatch.setattr(baret_script, "edit", recording)
    processed = scripted.run_img2img(img2img(scripted, photo, "a photo of walle", "blurry"))
    assert [(c.target, c.negative) for c in used] == [("a photo of walle", "blurry, walle-neg")]
    assert "\nNegative prompt: blurry, walle-neg\n" in processed.infotexts[0]
    assert "DreamArtist: walle" in processed.infotexts[0]


def test_progress_goes_to_the_webui_bar_and_interrupt_ends_the_edit_cleanly(scripted, photo, monkeypatch):
    from modules.sd_hijack import model_hijack

    from extensions_builtin_compat import baret_script

    state = scripted.shared.state
    model = scripted.shared.sd_model
    model_hijack.apply_optimizations()
    before, forwards = model_state(model), class_forwards()
    seen = []
    real_progress = baret_script._progress

    def interrupting(config, cached):
        report = real_progress(config, cached)

        def wrapped(progress):
            report(progress)
            seen.append((state.sampling_step, state.sampling_steps, state.textinfo))
            if progress.phase == "ttis" and progress.step == 2:
                state.interrupt()
        return wrapped

    monkeypatch.setattr(baret_script, "_progress", interrupting)
    processed = scripted.run_img2img(img2img(scripted, photo))
    assert seen == [(1, 9, "BARET: DDIM inversion, step 1 of 3"), (2, 9, "BARET: DDIM inversion, step 2 of 3"),
                    (3, 9, "BARET: DDIM inversion, step 3 of 3"), (4, 9, "BARET: target-text inversion, step 1 of 3"),
                    (5, 9, "BARET: target-text inversion, step 2 of 3")]
    assert processed.images == [] and processed.info == baret_script.STOPPED and one_sentence(processed.info)
    assert processed.infotexts == [baret_script.STOPPED]  # what the API returns as the run's infotexts
    assert not (scripted.root / "outputs").exists()
    assert not [m for m in attention_modules(model) if "forward" in m.__dict__]
    assert class_forwards() == forwards
    assert_same_state(before, model_state(model))


def test_an_interrupt_before_the_edit_begins_also_ends_cleanly(scripted, photo, monkeypatch):
    """Interrupted while the webui prepares the run (its img2img init): 1.6's process_images then fails on the
    missing infotext and 1.10's returns an empty run; either way the script returns the sentence."""
    from modules import processing

    from extensions_builtin_compat import baret_script

    real_init = processing.StableDiffusionProcessingImg2Img.init

    def interrupted_init(self, *args):
        real_init(self, *args)
        scripted.shared.state.interrupt()

    monkeypatch.setattr(processing.StableDiffusionProcessingImg2Img, "init", interrupted_init)
    calls = UNetCalls(scripted.shared.sd_model)
    try:
        processed = scripted.run_img2img(img2img(scripted, photo))
    finally:
        calls.remove()
    assert processed.images == [] and processed.infotexts == [baret_script.STOPPED] and calls.count == 0


def test_a_re_edit_with_other_alpha_and_tau_reuses_the_inversion(scripted, photo):
    first, again = UNetCalls(scripted.shared.sd_model), None
    try:
        edited = scripted.run_img2img(img2img(scripted, photo)).images[0]
        first.remove()
        again = UNetCalls(scripted.shared.sd_model)
        re_edited = scripted.run_img2img(img2img(scripted, photo, alpha_start=0.6, tau_sa=0.6, tau_ca=0.9)).images[0]
    finally:
        first.remove()
        if again is not None:
            again.remove()
    assert first.count >= 3 + 3 + 3 + 3 and again.count == 3  # inversion, TTIS (>= 2 calls a step), editing
    assert edited.tobytes() != re_edited.tobytes()


BAD_INPUT = {
    "empty target": (dict(prompt="  "), "target text is empty"),
    "only a lora tag": (dict(prompt="<lora:walle:1>"), "target text is empty"),
    "width": (dict(width=60), "multiple of 8"),
    "alpha": (dict(alpha_start=1.5), "between 0.0 and 1.0"),
    "tau window": (dict(sa_start=0.5, tau_sa=0.3), "starts at 0.5"),
    "layers": (dict(sa_layers="middle"), "must be one of"),
    "batch": (dict(batch_size=2), "one image at a time"),
    "mask": (dict(mask=Image.new("L", (64, 64))), "without a mask"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_sentence_before_any_work(scripted, photo, case):
    changes, words = BAD_INPUT[case]
    calls = UNetCalls(scripted.shared.sd_model)
    try:
        sentence = refusal(scripted.run_img2img(img2img(scripted, photo, **changes)))
    finally:
        calls.remove()
    assert words in sentence and one_sentence(sentence), sentence
    assert calls.count == 0 and not (scripted.root / "outputs").exists()


def refusal(processed) -> str:
    """The one sentence of a refused edit, which comes back as the run's info with no image (a raised error would
    be logged by the webui's API with its traceback)."""
    assert processed.images == [] and processed.infotexts == [processed.info], processed.infotexts
    return processed.info


def test_api_callers_may_pass_fewer_arguments(scripted, photo):
    from modules import scripts

    p = scripted.img2img(photo, script="baret edit", prompt="a green disc", steps=2,
                         script_args={"baret edit": [0.8, 0.1, False, 0.3, 0.0, 0.6, 0.0, "all", "all", "target", 1]})
    (script,) = scripts.scripts_img2img.selectable_scripts
    assert script.args_to - script.args_from == 11
    processed = scripted.run_img2img(p)
    assert len(processed.images) == 1 and "BARET TTIS lr: 0.001" in processed.infotexts[0]


def test_the_same_txt2img_seed_gives_the_same_image_after_an_edit(scripted, photo):
    from modules.sd_hijack import model_hijack

    model = scripted.shared.sd_model
    model_hijack.apply_optimizations()
    before, forwards = model_state(model), class_forwards()
    first = scripted.process_images(scripted.txt2img(prompt="a red disc", seed=4321)).images[0]
    scripted.run_img2img(img2img(scripted, photo, rigid=True))
    second = scripted.process_images(scripted.txt2img(prompt="a red disc", seed=4321)).images[0]
    assert first.tobytes() == second.tobytes()
    assert class_forwards() == forwards and model_hijack.optimization_method == "sdp"
    assert_same_state(before, model_state(model))


def test_an_sdxl_edit_goes_through_the_sgm_unet(host_v1101, photo):
    load_extension(host_v1101)
    model = host_v1101.load_model("sdxl")
    probe = UNetCalls(model)
    try:
        processed = host_v1101.run_img2img(img2img(host_v1101, photo, steps=2))
    finally:
        probe.remove()
    assert len(processed.images) == 1 and probe.count >= 2 + 2 * 2 + 2
    assert not [m for m in model.model.diffusion_model.modules() if "forward" in m.__dict__
                and type(m).__name__ == "CrossAttention"]


# -- the Forge family -----------------------------------------------------------------------------------------------
FORGE_FAMILY = ["host_neo", "host_forge", "host_reforge", "host_classic"]


@pytest.fixture(params=FORGE_FAMILY, ids=lambda name: name.removeprefix("host_"))
def forge_family(request):
    host = request.getfixturevalue(request.param)
    load_extension(host)
    return host


def forge_attention(unet) -> list:
    return [m for m in unet.modules() if type(m).__name__ == "CrossAttention"]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_forge_family_edits_through_its_own_unet_and_leaves_the_model_as_it_was(forge_family, photo, kind):
    """Each samples inside torch.inference_mode (Neo's and original Forge's weights are inference tensors, Classic's
    blocks add residuals in place): the edit's target-text inversion takes its gradient through all of that, its
    calls go through the host's own UNet, and nothing of the edit is left on the model."""
    from test_host_neo import assert_same_parts, parts_state

    from extensions_builtin_compat.host import runs_forge_engine
    from extensions_builtin_compat.host_attention import attention_layers
    from extensions_builtin_compat.host_backend import unet_of

    model = forge_family.load_model(kind)
    unet = unet_of(model)
    assert len(attention_layers(unet)) == len(forge_attention(unet)) > 0  # the control finds every one
    forge_family.process_images(forge_family.txt2img(prompt="a photo"))  # transformers hooks its encoder at first use
    # the backend's parts (Neo, original Forge), or the webui's model object over them (reForge, Classic)
    state, same = (parts_state, assert_same_parts) if runs_forge_engine(model) else (model_state, assert_same_state)
    before = state(model)
    calls = UNetCalls(model, unet)
    try:
        processed = forge_family.run_img2img(img2img(forge_family, photo, steps=2, branches=True))
    finally:
        calls.remove()
    assert len(processed.images) == 3 and "Script: BARET edit" in processed.infotexts[0]
    assert calls.count >= 2 + 2 * 2 + 2  # inversion, TTIS (at least one Adam step per step), editing
    assert not [m for m in forge_attention(unet) if "forward" in m.__dict__]
    same(before, state(model))


def test_a_pass_through_control_of_neos_attention_keeps_its_separate_values(host_neo):
    """Neo's (and ldm_patched's) attention takes the values' context apart from the keys' (``value``, which
    ComfyUI-style patches hand it): the control keeps it."""
    from extensions_builtin_compat.host_backend_forge import ForgeBackend

    model = host_neo.load_model("sd1")
    backend = ForgeBackend(model)
    module = forge_attention(backend.kmodel.diffusion_model)[1]  # an attn2
    generator = torch.Generator().manual_seed(0)
    x, context, value = (torch.randn(2, n, d, generator=generator) for n, d in ((16, 8), (77, 32), (77, 32)))
    with torch.no_grad():
        plain, keys_only = module(x, context=context, value=value), module(x, context=context)
        with controlled(backend, Probe()) as calls, calls.at(0, ROWS[:2]):
            calls.latent_tokens = 16
            watched = module(x, context=context, value=value)
    assert not torch.allclose(plain, keys_only)
    torch.testing.assert_close(watched, plain, atol=1e-5, rtol=1e-5)


def test_the_same_txt2img_seed_gives_the_same_image_after_an_edit_in_neo(host_neo, photo):
    load_extension(host_neo)
    host_neo.load_model("sd1")
    first = host_neo.process_images(host_neo.txt2img(prompt="a red disc", seed=4321)).images[0]
    host_neo.run_img2img(img2img(host_neo, photo, rigid=True))
    second = host_neo.process_images(host_neo.txt2img(prompt="a red disc", seed=4321)).images[0]
    assert first.tobytes() == second.tobytes()


def test_a_model_it_cannot_edit_with_is_refused_in_one_sentence_before_any_work(scripted, photo):
    model = scripted.load_model("sd1-inpainting")
    calls = UNetCalls(model)
    try:
        sentence = refusal(scripted.run_img2img(img2img(scripted, photo)))
    finally:
        calls.remove()
    assert "inpainting" in sentence and one_sentence(sentence) and calls.count == 0
