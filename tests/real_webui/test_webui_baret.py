"""BARET edit in real webuis (AUTOMATIC1111 and the Forge family: Neo, Classic, reForge): the img2img script is
listed, edits from the img2img tab in chromium and through /sdapi/v1/img2img with script_name (an image, the branch
images and an infotext carrying every BARET setting, at 64 px and 4 steps), Interrupt ends an edit cleanly, and the
same txt2img seed gives the same image afterwards; in AUTOMATIC1111 also the same edit under every attention
optimisation the webui offers on a CPU. The log check is test_webui_extension.py's (the whole log).

    DREAMARTIST_WEBUI_HARNESS=... DREAMARTIST_WEBUI_VERSIONS=1.10.1,1.6.0,neo,classic,reforge \\
        DREAMARTIST_WEBUI_INSTALL=copy .venv/bin/python -m pytest tests/real_webui/test_webui_baret.py \\
        tests/real_webui/test_webui_extension.py -k "baret or log_has" -v
"""
from __future__ import annotations

import io
import json
import threading
import time

import pytest
from webui_harness import BASELINE, FOLLOWS, one_sentence, parse_infotext, png_base64, skip_without_harness

skip_without_harness()

TITLE = "BARET edit"
STEPS = 4
TARGET = "a green disc on a blue ground"
# the script's arguments in order (extensions_builtin_compat.baret_script: KNOBS, then the branches checkbox)
KNOBS = dict(alpha_start=0.7, alpha_end=0.1, rigid=False, tau_sa=0.5, sa_start=0.0, tau_ca=0.75, ca_start=0.0,
             sa_layers="all", ca_layers="decoder", inversion_prompt="empty", ttis_iterations=1, ttis_lr=0.001,
             threshold_start=1e-05, threshold_step=2e-05, branches=True)
INFOTEXT = {"BARET alpha start": "0.7", "BARET alpha end": "0.1", "BARET rigid": "False", "BARET tau_SA": "0.5",
            "BARET SA start": "0.0", "BARET tau_CA": "0.75", "BARET CA start": "0.0", "BARET SA layers": "all",
            "BARET CA layers": "decoder", "BARET inversion prompt": "empty", "BARET TTIS iterations": "1",
            "BARET TTIS lr": "0.001", "BARET threshold start": "1e-05", "BARET threshold step": "2e-05",
            "BARET branches": "True", "Script": TITLE, "Sampler": "DDIM", "Steps": str(STEPS)}


@pytest.fixture
def a1111(webui):
    if webui.version in FOLLOWS:
        pytest.skip(f"webui {webui.version}: the attention optimisations are AUTOMATIC1111's settings")
    return webui


def edit_request(webui, reference_image, **changes) -> dict:
    knobs = KNOBS | changes
    return webui.payload(TARGET, steps=STEPS, init_images=[png_base64(reference_image)], denoising_strength=0.75,
                         script_name=TITLE, script_args=list(knobs.values()))


def test_baret_is_listed_in_img2img_only(webui):
    reply = webui.get("/sdapi/v1/scripts")
    assert reply.status == 200, reply
    listed = reply.json()
    assert TITLE.lower() in listed["img2img"] and TITLE.lower() not in listed["txt2img"], listed


def test_baret_edits_through_the_api_with_its_settings_in_the_infotext(webui, reference_image, output_dir):
    from PIL import Image

    started = time.monotonic()
    first = webui.generate("img2img", edit_request(webui, reference_image))
    first_s = time.monotonic() - started
    assert len(first.images) == 3, first.info  # the edit, the reconstruction and the transition
    for data in first.images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (64, 64)
    assert first.images[0] != first.images[1]
    info = parse_infotext(first.infotext)
    assert info.prompt == TARGET, first.infotext
    assert {key: info.params.get(key) for key in INFOTEXT} == INFOTEXT, first.infotext
    assert first.png_parameters() == first.infotext
    # a re-edit with other alpha and tau reuses the inversion and target-text inversion
    started = time.monotonic()
    again = webui.generate("img2img", edit_request(webui, reference_image, alpha_start=0.6, tau_sa=0.3,
                                                   branches=False))
    again_s = time.monotonic() - started
    assert len(again.images) == 1 and again.images[0] != first.images[0]
    assert parse_infotext(again.infotext).params["BARET tau_SA"] == "0.3"
    (output_dir / f"baret-{webui.tag}.txt").write_text(f"BARET edit at 64 px, {STEPS} steps, 1 TTIS iteration: "
                                                      f"{first_s:.1f} s; re-edit (cached inversion): {again_s:.1f} s\n")


def test_baret_edits_from_the_img2img_tab_in_a_browser(webui, browser, reference_png, output_dir):
    """As a user does: the image dropped into img2img, the target text as the prompt, "BARET edit" picked in the Script
    dropdown, its controls set, Generate; the edit and its branch images come back with the settings in the
    infotext."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(120_000)
    try:
        page.goto(webui.url, wait_until="domcontentloaded")
        page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
        page.locator("#img2img_image input[type=file]").set_input_files(str(reference_png))
        page.locator("#img2img_prompt textarea").fill(TARGET)
        for control, value in (("steps", STEPS), ("width", 64), ("height", 64)):
            box = page.locator(f"#img2img_{control} input[type=number]")
            box.fill(str(value))
            box.press("Enter")
        page.locator("#tab_img2img #script_list input").click()
        page.locator("#tab_img2img #script_list ul.options li", has_text=TITLE).click()
        page.locator("#script_baret_edit_settings").wait_for(state="visible")
        box = page.locator("#script_baret_edit_ttis_iterations input[type=number]")
        box.fill("1")
        box.press("Enter")
        page.locator("#script_baret_edit_branches input[type=checkbox]").check()
        page.screenshot(path=str(output_dir / f"{webui.tag}-baret-before.png"), full_page=True)
        page.locator("#img2img_generate").click()
        # the HTML itself: inside a block of the same id (gradio 3), or inside that id's block (gradio 4: Neo)
        info = page.locator(":is(#html_info_img2img.prose, #html_info_img2img .prose)")
        expect(info).to_contain_text("BARET alpha start", timeout=900_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(output_dir / f"{webui.tag}-baret-after.png"), full_page=True)
        text = info.inner_text()
        assert TARGET in text and "Script: BARET edit" in text and "BARET TTIS iterations: 1" in text, text
        assert "BARET branches: True" in text and "BARET inversion prompt: empty" in text, text  # the default
        assert page.locator("#img2img_gallery img").count() >= 3, "the edit and its two branch images"
    finally:
        page.close()
    assert errors == []


def test_baret_interrupt_ends_the_edit_cleanly(webui, reference_image):
    """Interrupt while the edit inverts (2 TTIS iterations: not in the cache, so it inverts; the progress text of an
    earlier edit, which ends in "editing", stays in the state until the next run begins): no image, the sentence
    as the run's infotext."""
    replies = []
    worker = threading.Thread(target=lambda: replies.append(
        webui.post("/sdapi/v1/img2img", edit_request(webui, reference_image, ttis_iterations=2), timeout=600)))
    worker.start()
    seen = ""
    deadline = time.monotonic() + 300
    while worker.is_alive() and time.monotonic() < deadline:
        reply = webui.get("/sdapi/v1/progress?skip_current_image=true", timeout=30)
        seen = (reply.json().get("textinfo") or "") if reply.status == 200 else ""
        if "inversion" in seen:
            assert webui.post("/sdapi/v1/interrupt", timeout=30).status == 200
            break
        time.sleep(0.2)
    worker.join()
    assert "inversion" in seen, f"the progress API never showed the edit inverting (last: {seen!r})"
    (reply,) = replies
    assert reply.status == 200, reply
    body = reply.json()
    infotexts = json.loads(body["info"])["infotexts"]
    assert body["images"] == [] and len(infotexts) == 1 and one_sentence(infotexts[0]), body
    assert "stopped" in infotexts[0], infotexts


# Every optimisation the webui offers on a CPU (xformers needs CUDA): the setting's value, and its log line
OPTIMISATIONS = {"sdp - scaled dot product": "Applying attention optimization: sdp... done.",
                 "sdp-no-mem - scaled dot product without memory efficient attention":
                     "Applying attention optimization: sdp-no-mem... done.",
                 "sub-quadratic": "Applying attention optimization: sub-quadratic... done.",
                 "Doggettx": "Applying attention optimization: Doggettx... done.",
                 "V1 - original v1": "Applying attention optimization: V1... done.",
                 "None": "Disabling attention optimization"}


@pytest.fixture
def default_edit(a1111, reference_image) -> bytes:
    """The edit under the webui's default optimisation here (InvokeAI's split attention, on a CPU), made once per
    webui."""
    if not hasattr(a1111, "default_baret_edit"):
        request = edit_request(a1111, reference_image, tau_ca=0.5, branches=False)
        a1111.default_baret_edit = a1111.generate("img2img", request).images[0]
    return a1111.default_baret_edit


@pytest.mark.parametrize("optimisation", list(OPTIMISATIONS))
def test_baret_edits_the_same_under_every_attention_optimisation(a1111, reference_image, default_edit, optimisation):
    """Set in the settings (the webui re-applies the optimisation when that setting changes) and set back after. The
    edit's attention runs through the control whatever the optimisation; only the VAE's own attention block follows
    the optimisation, so the pixels may differ by rounding and no more."""
    from PIL import Image, ImageChops

    key = "cross_attention_optimization"
    before, logged = a1111.get("/sdapi/v1/options").json()[key], len(a1111.log_text())
    assert a1111.post("/sdapi/v1/options", {key: optimisation}, timeout=300).status == 200
    try:
        assert OPTIMISATIONS[optimisation] in a1111.log_text()[logged:], a1111.log_text()[logged:]
        generation = a1111.generate("img2img", edit_request(a1111, reference_image, tau_ca=0.5, branches=False))
    finally:
        assert a1111.post("/sdapi/v1/options", {key: before}, timeout=300).status == 200
    assert len(generation.images) == 1, generation.info
    assert parse_infotext(generation.infotext).params.get("BARET tau_CA") == "0.5", generation.infotext
    with Image.open(io.BytesIO(default_edit)) as first, Image.open(io.BytesIO(generation.images[0])) as second:
        difference = ImageChops.difference(first.convert("RGB"), second.convert("RGB"))
        assert max(high for _low, high in difference.getextrema()) <= 2, difference.getextrema()


def test_baret_leaves_txt2img_as_it_was(webui, reference_image):
    """After the edits, the same seed and prompt give the same pixels as before any of them."""
    from PIL import Image, ImageChops

    webui.generate("img2img", edit_request(webui, reference_image, rigid=True, branches=False))
    after = webui.generate("txt2img", webui.payload(**BASELINE)).images[0]
    with Image.open(io.BytesIO(webui.baseline)) as first, Image.open(io.BytesIO(after)) as second:
        first, second = first.convert("RGB"), second.convert("RGB")
        if first.tobytes() != second.tobytes():
            changed = sum(1 for pixel in ImageChops.difference(first, second).getdata() if any(pixel))
            pytest.fail(f"{changed} of {first.width * first.height} pixels differ from the image generated before")
