"""Identity mode in real webuis (A1111 1.6.0 and 1.10.1, and the Forge family: Neo, Classic, reForge): an identity
trained through the API lands in models/dreamartist-identities (not where the embedding loader reads); a
prompt naming it gets the stage variants in txt2img (every row layout, the hires pass) and img2img, seen by the
test-only probe (tests/real_webui/probe: per UNet call its timesteps and, at the first cross-attention, which rows
read values from another context than keys); other prompts and the same-seed image are as before; the tab trains
one in chromium.

runs on its own:  DREAMARTIST_WEBUI_HARNESS=... .venv/bin/python -m pytest tests/real_webui/test_webui_identity.py
"""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
from webui_harness import BASELINE, FOLLOWS, one_sentence, parse_infotext, png_base64, skip_without_harness

skip_without_harness()

NAME = "da_face"


def face_mask():
    from PIL import Image, ImageDraw

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    return mask


@pytest.fixture(scope="module")
def identity(webui, reference_image):
    reply = webui.post("/dreamartist/v1/train", {"mode": "identity", "image": png_base64(reference_image),
                                                 "mask": png_base64(face_mask()), "name": NAME, "steps": 3,
                                                 "width": 64, "height": 64})
    assert reply.status == 200, reply
    folder = webui.folder / "models" / "dreamartist-identities"
    assert (folder / f"{NAME}.identity.safetensors").is_file()
    assert not list(webui.embeddings.glob(f"{NAME}*"))  # outside the folder the embedding loader reads
    return NAME


def seen(webui, kind: str, payload: dict):
    assert webui.post("/dreamartist-probe/v1/watch", {}).status == 200
    try:
        generation = webui.generate(kind, payload)
        calls = webui.get("/dreamartist-probe/v1/identity").json()["calls"]
    finally:
        webui.post("/dreamartist-probe/v1/unwatch", {})
    return calls, generation


def da() -> dict:
    return {"alwayson_scripts": {"dreamartist": {"args": [True, "pair", 0.8, 0.65]}}}


LAYOUTS = {  # name: (payload changes, which rows of each UNet call hold the identity)
    "one batched call": ({}, [[True, False]]),
    "batch_cond_uncond off": ({"override_settings": {"batch_cond_uncond": False}}, [[True], [False]]),
    "a prompt of other length": ({"prompt": f"{NAME} " + "word " * 80}, [[True], [False]]),
    "AND prompts": ({"prompt": f"{NAME} AND a red cat"}, [[True, False, False]]),
    "batch of two": ({"batch_size": 2}, [[True, True, False, False]]),
}


def by_step(calls) -> list[list[bool]]:
    """Each step's rows, whichever calls and order the sampler put them in (a step's calls come one after another at
    its timestep; a hires pass may start at a timestep the first pass ended on)."""
    steps: list[tuple[float, list[bool]]] = []
    for call in calls:
        t = round(call["t"][0], 3)
        if not steps or steps[-1][0] != t:
            steps.append((t, []))
        steps[-1][1].extend(call["split"])
    return [rows for _, rows in steps]


def assert_layout(webui, calls, per_step) -> None:
    if webui.version in FOLLOWS:
        # the Forge family batches cond and uncond rows its own way (uncond first, shorter rows repeated up to the
        # longest) and Classic leaves the uncond rows out of a pass's first step: each step has the identity's rows,
        # and no row of another prompt takes it
        wanted = [row for call in per_step for row in call]
        assert calls and all(rows.count(True) == wanted.count(True) and rows.count(False) <= wanted.count(False)
                             for rows in by_step(calls)), calls
    else:  # AUTOMATIC1111's own layout: the calls of each step as its CFG denoiser makes them
        assert calls and all(call["split"] in per_step for call in calls), calls


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_rows_naming_the_identity_read_keys_and_values_from_its_stage_variants(webui, identity, layout):
    changes, per_step = LAYOUTS[layout]
    for key in changes.get("override_settings", {}):
        if key not in webui.get("/sdapi/v1/options").json():
            pytest.skip(f"webui {webui.version} has no {key} setting")
    calls, generation = seen(webui, "txt2img", {**webui.payload(f"a photo of {NAME}", steps=4), **da(), **changes})
    assert_layout(webui, calls, per_step)
    params = parse_infotext(generation.infotext).params
    assert params.get("DreamArtist identity") == NAME
    assert params.get("TI") in (None, NAME), params  # Neo notes the carrier it spliced in, once


def test_each_call_gets_the_variant_of_its_timesteps_stage(webui, identity):
    calls, _ = seen(webui, "txt2img", {**webui.payload(f"a photo of {NAME}", steps=8), **da()})
    by_stage: dict[int, set[float]] = {}
    for call in calls:
        row = call["split"].index(True)  # the cond row (the Forge family batches it after the uncond row)
        by_stage.setdefault(min(int(call["t"][0] * 5 // 1000), 4), set()).add(round(call["keys"][row], 3))
    assert len(by_stage) >= 3, calls  # eight Euler steps cross several stages
    assert all(len(sums) == 1 for sums in by_stage.values()), by_stage  # one K variant per stage
    assert len({next(iter(s)) for s in by_stage.values()}) == len(by_stage)  # a different one in each


def test_the_hires_pass_and_img2img_apply_it_and_other_prompts_are_untouched(webui, identity, reference_image):
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.5}
    if webui.version == "neo":  # no latent upscalers; its API needs the hires modules named
        hires |= {"hr_upscaler": "None", "hr_additional_modules": ["Use same choices"]}
    calls, _ = seen(webui, "txt2img", {**webui.payload(f"a photo of {NAME}", steps=2), **da(), **hires})
    assert len(calls) >= 4, calls
    assert_layout(webui, calls, [[True, False]])
    img2img = {**webui.payload(f"a photo of {NAME}", steps=3), **da(), "init_images": [png_base64(reference_image)],
               "denoising_strength": 0.6}
    calls, _ = seen(webui, "img2img", img2img)
    assert_layout(webui, calls, [[True, False]])
    calls, generation = seen(webui, "txt2img", {**webui.payload("a red disc", steps=2), **da()})
    assert calls and all(not any(call["split"]) for call in calls)
    assert "DreamArtist identity" not in generation.infotext


def test_the_same_seed_gives_the_same_image_after_identities_were_used(webui, identity):
    webui.generate("txt2img", {**webui.payload(f"a photo of {NAME}"), **da()})
    assert webui.generate("txt2img", webui.payload(**BASELINE)).images[0] == webui.baseline


def test_the_identities_route_lists_it(webui, identity):
    reply = webui.get("/dreamartist/v1/identities")
    assert reply.status == 200 and NAME in reply.json()["identities"], reply


def test_the_tab_trains_an_identity_in_chromium(browser, webui, reference_png, output_dir, tmp_path):
    """The Identity sub-tab: face, mask, name, Train; the webui's progress bar follows the run and the result names
    the file."""
    import time

    mask_png = tmp_path / "mask.png"
    face_mask().save(mask_png)
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(60_000)
    try:
        page.goto(webui.url, wait_until="domcontentloaded")
        page.locator("#tabs > .tab-nav button", has_text="DreamArtist").click()
        page.locator("#dreamartist_modes button", has_text="Identity").click()
        page.locator("#dreamartist_identity_train").wait_for(state="visible")
        # its own defaults, not the pair side's (the webui's ui-config keys controls by label)
        assert page.locator("#dreamartist_identity_lr input").first.input_value() == "0.005"
        page.locator("#dreamartist_identity_reference input[type=file]").set_input_files(str(reference_png))
        page.locator("#dreamartist_identity_mask input[type=file]").set_input_files(str(mask_png))
        page.locator("#dreamartist_identity_name :is(input, textarea)").fill("da_tab_face")
        for control, value in (("steps", 3), ("width", 64), ("height", 64)):
            box = page.locator(f"#dreamartist_identity_{control} input[type=number]")
            box.fill(str(value))
            box.press("Enter")
        page.wait_for_timeout(500)
        page.locator("#dreamartist_identity_train").click()
        saw_bar, text = False, ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            saw_bar = saw_bar or page.locator(".progressDiv").count() > 0
            result = page.locator("#dreamartist_identity_result .prose")
            text = result.first.inner_text().strip() if result.count() else ""
            if text and not page.locator("#dreamartist_identity_result.dreamartist-stale").count():
                break
            page.wait_for_timeout(500)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(output_dir / f"{webui.tag}-identity-tab-after.png"), full_page=True)
    finally:
        page.close()
    assert "da_tab_face.identity.safetensors" in text, text
    assert saw_bar, "the webui's progress bar (.progressDiv) never showed"
    assert (webui.folder / "models" / "dreamartist-identities" / "da_tab_face.identity.safetensors").is_file()
    assert errors == []


def test_an_identity_trains_from_a_photo_without_a_mask(webui):
    """The webui's own OpenCV finds the face of a real photo (tests/data/face.png) when no mask is sent; a picture
    without a face is answered with one sentence."""
    photo = Path(__file__).resolve().parents[1] / "data" / "face.png"
    request = {"mode": "identity", "image": base64.b64encode(photo.read_bytes()).decode(), "steps": 1, "width": 64,
               "height": 64}
    reply = webui.post("/dreamartist/v1/train", {**request, "name": f"{NAME}_found"})
    assert reply.status == 200, reply
    assert (webui.folder / "models" / "dreamartist-identities" / f"{NAME}_found.identity.safetensors").is_file()
    blank = webui.post("/dreamartist/v1/train", {**request, "image": png_base64(face_mask()), "name": f"{NAME}_none"})
    assert blank.status == 422 and "No face was found" in blank.detail and one_sentence(blank.detail), blank

