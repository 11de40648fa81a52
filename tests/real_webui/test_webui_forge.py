"""DreamArtist in Forge Neo, where it pairs but does not train: the extension loads with a clean log, its tab renders
(gradio 4) and says in one sentence that training is not available, the training API answers 501 with that
sentence, a pair in models/embeddings brings NAME-neg along, and a pair's PN adapters stay off without errors.
Which prompts pair, weight by weight and step by step: test_webui_pairing.py.

runs on its own:  DREAMARTIST_WEBUI_HARNESS=... DREAMARTIST_WEBUI_VERSIONS=neo DREAMARTIST_WEBUI_INSTALL=copy \\
                  .venv/bin/python -m pytest tests/real_webui/test_webui_forge.py tests/real_webui/test_webui_pairing.py
"""
from __future__ import annotations

import re
import sys

import pytest
from webui_harness import REPO, one_sentence, parse_infotext, png_base64, skip_without_harness

skip_without_harness()

NAME = "da_neo"
PAGE_TIMEOUT_MS = 120_000
TRAIN_REFUSAL = "Training in Forge is not supported yet"
KNOWN_NOISE = [
    # a stock Neo on a CPU-only machine: no NVIDIA driver; torch deprecates torch.jit.script (used at import)
    r"Found no NVIDIA driver on your system\.\s+memmon\.py :: WARNING",
    r"FutureWarning: `torch\.jit\.script` is deprecated",
    r"^\s*warnings\.warn\($",
    # test_webui_pairing.py's lora_tag_only case asks for <lora:dapair:1>, which does not exist: Neo's built-in
    # Lora logs that as an error (A1111's only notes it in the infotext)
    r'^Failed to load LoRA: "dapair"\s+networks\.py :: ERROR',
]
SUSPECT = re.compile(r"traceback|error|exception|warn|dreamartist", re.IGNORECASE)


def components(webui) -> dict[str, dict]:
    """The page's gradio components by elem_id, as the webui's /config serves them to the browser."""
    reply = webui.get("/config", timeout=120)
    assert reply.status == 200, reply
    found = {}
    for component in reply.json()["components"]:
        props = component.get("props", {})
        if props.get("elem_id"):
            found[props["elem_id"]] = {"type": component.get("type"), **props}
    return found


def test_install_script_installs_nothing(webui):
    assert webui.install_rc == 0, webui.install_output
    assert webui.install_output == "", webui.install_output
    assert webui.packages_after == webui.packages_before


def test_tab_says_in_one_sentence_that_training_is_not_available(webui):
    sys.path.insert(0, str(REPO))
    try:
        from dreamartist import config as train_config
    finally:
        sys.path.remove(str(REPO))
    found = components(webui)
    notice = re.sub(r"<[^>]+>", "", found["dreamartist_notice"]["value"])
    assert notice.startswith(TRAIN_REFUSAL) and one_sentence(notice), notice
    assert str(webui.embeddings) in notice, notice
    assert found["dreamartist_train"].get("interactive") is False
    missing = [f.name for f in train_config.fields() if f"dreamartist_{f.name}" not in found]
    assert missing == [], missing
    for item in ("reference", "mask", "folder", "resume_pair", "gallery", "result", "task_id"):
        assert f"dreamartist_{item}" in found, item


def test_tab_renders_in_the_browser(browser, webui, output_dir):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        page.goto(webui.url, wait_until="domcontentloaded")
        page.locator("#tabs > .tab-nav button", has_text="DreamArtist").click()
        page.locator("#dreamartist_notice").wait_for(state="visible")
        assert page.locator("#dreamartist_notice").inner_text().strip().startswith(TRAIN_REFUSAL)
        assert page.locator("#dreamartist_train").is_disabled()
        assert page.locator("#dreamartist_steps").is_visible()
        (output_dir / "screenshots").mkdir(exist_ok=True)
        page.screenshot(path=str(output_dir / "screenshots" / f"tab-{webui.tag}.png"), full_page=True)
    finally:
        page.close()
    assert [e for e in errors if "dreamartist" in e.lower()] == [], errors


def test_training_api_answers_501_with_the_sentence(webui, reference_image):
    reply = webui.post("/dreamartist/v1/train", {"image": png_base64(reference_image), "name": "da_never",
                                                 "steps": 2, "width": 64, "height": 64})
    assert reply.status == 501, reply
    assert reply.detail.startswith(TRAIN_REFUSAL) and one_sentence(reply.detail), reply
    assert not any(webui.embeddings.glob("da_never*"))


@pytest.fixture(scope="module")
def neo_pair(webui):
    """A DreamArtist pair (768-wide, as the harness's SD1.5 needs) with PN adapters, written into models/embeddings
    while the webui runs; Neo's text engines read that folder when the model loads, so the model is unloaded and the
    next generation loads it again, as a user does after copying a pair in."""
    import torch

    sys.path.insert(0, str(REPO))
    try:
        from dreamartist.pairfiles import save_pair
    finally:
        sys.path.remove(str(REPO))
    generator = torch.Generator().manual_seed(0)
    pos = {"clip_l": torch.randn(2, 768, generator=generator) * 0.02}
    neg = {"clip_l": torch.randn(2, 768, generator=generator) * 0.02}
    adapters = {f"unet_{branch}": {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.down": torch.zeros(2, 768)}
                for branch in ("pos", "neg")}
    save_pair(webui.embeddings, NAME, pos, neg, adapters=adapters)
    assert webui.post("/sdapi/v1/unload-checkpoint", timeout=300).status == 200
    webui.generate("txt2img", webui.payload("a", steps=1))
    reply = webui.get("/dreamartist/v1/pairs")
    assert reply.status == 200 and NAME in reply.json()["pairs"], reply
    return NAME


@pytest.mark.parametrize("mode", ["pair", "DA++"])
def test_txt2img_adds_the_partner_and_leaves_the_adapters_off(webui, neo_pair, mode):
    payload = webui.payload(f"a photo of ({neo_pair}:1.2)", "blurry", steps=2,
                            alwayson_scripts={"DreamArtist": {"args": [True, mode, 0.8, 0.65]}})
    generation = webui.generate("txt2img", payload)
    info = parse_infotext(generation.infotext)
    assert info.negative == f"blurry, ({neo_pair}-neg:1.2)", generation.infotext
    assert info.params.get("DreamArtist") == neo_pair, generation.infotext
    assert "DreamArtist adapters" not in info.params, generation.infotext
    assert generation.info["all_negative_prompts"][0] == info.negative


def test_txt2img_without_pairing_leaves_the_negative_prompt(webui, neo_pair):
    payload = webui.payload(f"a photo of {neo_pair}", "blurry", steps=2,
                            alwayson_scripts={"DreamArtist": {"args": [False]}})
    info = parse_infotext(webui.generate("txt2img", payload).infotext)
    assert info.negative == "blurry" and info.params.get("DreamArtist") == "off"


@pytest.mark.webui_phase(2)
def test_log_has_no_errors_from_the_extension(webui):
    """No traceback, and no line about the extension but the webui's own listing of loaded scripts. (Neo's
    /sdapi/v1/cmd-flags writes a traceback whenever --port is given: nothing here calls it.)"""
    noise = re.compile("|".join(f"(?:{pattern})" for pattern in KNOWN_NOISE))
    offending = [line for line in webui.log_text().splitlines()
                 if (SUSPECT.search(line) or webui.extension.name in line) and not noise.search(line)]
    assert offending == [], "\n".join(offending[:60])
