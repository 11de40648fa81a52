"""DreamArtist in Forge Neo, whose text engines read the embeddings folder only when the model loads: a pair copied
into models/embeddings by hand brings NAME-neg along after a reload, and its PN adapters apply (DA++ puts phi^n in
S^n's place).
Training, the tab, the API and the log: test_webui_extension.py; which prompts pair: test_webui_pairing.py.

runs on its own:  DREAMARTIST_WEBUI_HARNESS=... DREAMARTIST_WEBUI_VERSIONS=neo DREAMARTIST_WEBUI_INSTALL=copy \\
                  .venv/bin/python -m pytest tests/real_webui/test_webui_forge.py tests/real_webui/test_webui_pairing.py
"""
from __future__ import annotations

import sys

import pytest
from webui_harness import REPO, parse_infotext, skip_without_harness

skip_without_harness()

NAME = "da_neo"


@pytest.fixture(scope="module")
def neo_pair(webui):
    """A DreamArtist pair (768-wide, as the harness's SD1.5 needs) with PN adapters, written into models/embeddings
    while the webui runs; Neo's text engines read that folder when the model loads, so the model is unloaded and the
    next generation loads it again, as a user does after copying a pair in."""
    import torch

    sys.path.insert(0, str(REPO))
    try:
        from dreamartist.adapters import Lora, flatten
        from dreamartist.pairfiles import save_pair
    finally:
        sys.path.remove(str(REPO))
    generator = torch.Generator().manual_seed(0)
    pos = {"clip_l": torch.randn(2, 768, generator=generator) * 0.02}
    neg = {"clip_l": torch.randn(2, 768, generator=generator) * 0.02}
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # 768 in, 320 out
    adapters = {f"unet_{branch}": flatten({layer: Lora(torch.randn(2, 768, generator=generator) * 0.1,
                                                       torch.randn(320, 2, generator=generator) * 0.1, 2.0)})
                for branch in ("pos", "neg")}
    save_pair(webui.embeddings, NAME, pos, neg, adapters=adapters)
    assert webui.post("/sdapi/v1/unload-checkpoint", timeout=300).status == 200
    webui.generate("txt2img", webui.payload("a", steps=1))
    reply = webui.get("/dreamartist/v1/pairs")
    assert reply.status == 200 and NAME in reply.json()["pairs"], reply
    return NAME


@pytest.mark.parametrize("mode", ["pair", "DA++"])
def test_txt2img_adds_the_partner_and_applies_the_adapters(webui, neo_pair, mode):
    payload = webui.payload(f"a photo of ({neo_pair}:1.2)", "blurry", steps=2,
                            alwayson_scripts={"DreamArtist": {"args": [True, mode, 0.8, 0.65]}})
    generation = webui.generate("txt2img", payload)
    info = parse_infotext(generation.infotext)
    assert info.negative == ("blurry" if mode == "DA++" else f"blurry, ({neo_pair}-neg:1.2)"), generation.infotext
    assert info.params.get("DreamArtist") == neo_pair, generation.infotext
    assert info.params.get("DreamArtist adapters") == f"{mode}, 0.8, 0.65", generation.infotext
    assert generation.info["all_negative_prompts"][0] == info.negative
    off = webui.generate("txt2img", {**payload, "alwayson_scripts": {"DreamArtist": {"args": [True, "off"]}}})
    assert off.images[0] != generation.images[0]  # the adapters changed the image


def test_txt2img_without_pairing_leaves_the_negative_prompt(webui, neo_pair):
    payload = webui.payload(f"a photo of {neo_pair}", "blurry", steps=2,
                            alwayson_scripts={"DreamArtist": {"args": [False]}})
    info = parse_infotext(webui.generate("txt2img", payload).infotext)
    assert info.negative == "blurry" and info.params.get("DreamArtist") == "off"
