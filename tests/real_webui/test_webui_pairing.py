"""Automatic pairing in real webuis: which prompts bring NAME-neg into the negative prompt, with which weight and for
which sampling steps, judged by the webui's own prompt parser on the infotext of a real txt2img.

The pair is copied into the embeddings folder by hand (plain textual-inversion files, no training), so this file
runs on its own:  ... -m pytest tests/real_webui/test_webui_pairing.py
"""
from __future__ import annotations

import pytest
from webui_harness import parse_infotext, skip_without_harness, weights_per_step

skip_without_harness()

NAME = "dapair"
NEGATIVE = f"{NAME}-neg"
STEPS = 4  # [NAME:other:0.5] switches after step 2 of 4
USER_NEGATIVE = "blurry"

# id -> (prompt, whether NAME-neg must follow NAME, extra request fields)
CASES = {
    "plain": (f"a photo of {NAME}", True, {}),
    "weighted": (f"a photo of ({NAME}:1.3)", True, {}),
    "double_parentheses": (f"a photo of (({NAME}))", True, {}),  # 1.1 * 1.1 = 1.21
    "square_brackets": (f"a photo of [{NAME}]", True, {}),  # 1 / 1.1
    "weighted_phrase": (f"(a {NAME}:1.3) on the beach", True, {}),
    "prompt_editing": (f"a photo of [{NAME}:a cat:0.5]", True, {}),  # S^n only while S^p is used
    "other_case": (f"a photo of {NAME.upper()}", True, {}),  # the tokenizer lowercases: the embedding is used
    "lora_tag_only": (f"a photo, <lora:{NAME}:1>", False, {}),  # an extra network, not the word
    "prefix_of_a_word": (f"a photo of {NAME}x", False, {}),  # another word: the embedding is not used
    "partner_already_there": (f"a photo of {NAME}", True, {"negative_prompt": f"{USER_NEGATIVE}, {NEGATIVE}"}),
    "checkbox_off": (f"a photo of {NAME}", False, {"alwayson_scripts": {"DreamArtist": {"args": [False]}}}),
}


@pytest.fixture(scope="session")
def handmade_pair(webui):
    """NAME.pt and NAME-neg.pt written as plain textual-inversion files, as a user copies a pair in by hand."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for name in (NAME, NEGATIVE):
        vectors = torch.randn(2, 768, generator=generator) * 0.02
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 0,
                    "sd_checkpoint": None, "sd_checkpoint_name": None}, webui.embeddings / f"{name}.pt")
    webui.post("/sdapi/v1/refresh-embeddings", timeout=120)  # 1.7+; older webuis reload at the next generation
    if webui.reads_embeddings_at_load:  # Forge Neo: each text engine reads the folder when the model loads
        assert webui.post("/sdapi/v1/unload-checkpoint", timeout=300).status == 200
    webui.generate("txt2img", webui.payload("a", steps=1))
    reply = webui.get("/dreamartist/v1/pairs")
    assert reply.status == 200 and NAME in reply.json()["pairs"], reply
    return NAME


@pytest.mark.parametrize("case", list(CASES))
def test_pairing(webui, handmade_pair, case):
    prompt, paired, extra = CASES[case]
    request = webui.payload(prompt, USER_NEGATIVE, steps=STEPS, **extra)
    generation = webui.generate("txt2img", request)
    info = parse_infotext(generation.infotext)
    assert info.prompt == prompt, generation.infotext
    assert USER_NEGATIVE in info.negative, generation.infotext
    positive_schedule, negative_schedule = webui.prompt_schedules([info.prompt, info.negative], STEPS)
    positive = weights_per_step(positive_schedule, NAME, STEPS)
    negative = weights_per_step(negative_schedule, NEGATIVE, STEPS)
    context = (f"\ninfotext:\n{generation.infotext}\nweights of {NAME} per step: {positive}"
               f"\nweights of {NEGATIVE} per step: {negative}")
    if case == "partner_already_there":
        assert negative == positive, f"{NEGATIVE} was added a second time{context}"
    elif paired:
        assert any(positive), f"the webui does not see {NAME} in the prompt{context}"
        assert negative == positive, f"{NEGATIVE} does not follow {NAME} step by step, weight by weight{context}"
        assert info.params.get("DreamArtist", "").lower() == NAME, context
    else:
        assert not any(negative), f"{NEGATIVE} was added{context}"
        expected = "off" if case == "checkbox_off" else None
        assert info.params.get("DreamArtist") == expected, context
