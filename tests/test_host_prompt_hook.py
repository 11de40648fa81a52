"""The prompt hook through the webui's own processing order: each NAME brings NAME-neg to its image's
negative prompt, the conds and the infotext follow, and pasting the infotext restores the checkbox."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakehost.checks import write_pair

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hooked(host):
    write_pair(host.embeddings_dir, "walle", seed=1)
    write_pair(host.embeddings_dir, "robo", seed=2)
    host.load_extension(REPO)
    return host


def generate(host, enabled=True, **fields):
    p = host.txt2img(script_args={"dreamartist": [enabled]}, **fields)
    return p, host.process_images(p)


def uncond_prompts(cache_name="cached_uc"):
    from modules import processing

    return list(getattr(processing.StableDiffusionProcessingTxt2Img, cache_name)[0][0])


def test_plain_prompt_gets_its_partner_in_conds_and_infotext(hooked):
    p, processed = generate(hooked, prompt="a photo of walle", negative_prompt="")
    assert p.all_negative_prompts == ["walle-neg"]
    assert uncond_prompts() == ["walle-neg"]
    assert "\nNegative prompt: walle-neg\n" in processed.infotexts[0]
    assert "DreamArtist: walle" in processed.infotexts[0]


def test_grid_infotext_shows_the_first_images_partner_too(hooked):
    from modules import processing

    p, _ = generate(hooked, prompt=["walle", "an empty room"], negative_prompt="blurry", batch_size=2)
    grid_text = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, use_main_prompt=True)
    assert p.main_negative_prompt == "blurry, walle-neg"
    assert "\nNegative prompt: blurry, walle-neg\n" in grid_text


def test_weight_is_carried_to_the_partner(hooked):
    p, _ = generate(hooked, prompt="a photo of (walle:1.2)", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, (walle-neg:1.2)"]


def test_several_concepts_all_bring_their_partners(hooked):
    p, processed = generate(hooked, prompt="robo and walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry, robo-neg, walle-neg"]
    assert 'DreamArtist: "robo, walle"' in processed.infotexts[0]


def test_an_already_paired_prompt_is_left_alone(hooked):
    p, processed = generate(hooked, prompt="walle", negative_prompt="walle-neg, blurry")
    assert p.all_negative_prompts == ["walle-neg, blurry"]
    assert "DreamArtist" not in processed.infotexts[0]


def test_every_image_of_every_batch_gets_its_own_partners(hooked):
    prompts = ["walle", "robo", "walle with robo", "an empty room"]
    p, processed = generate(hooked, prompt=prompts, negative_prompt="blurry", batch_size=2, n_iter=2)
    expected = ["blurry, walle-neg", "blurry, robo-neg", "blurry, walle-neg, robo-neg", "blurry"]
    assert p.all_negative_prompts == expected
    assert uncond_prompts() == expected[2:]  # the last batch's conds
    assert [text.split("\n")[1] for text in processed.infotexts] == [f"Negative prompt: {n}" for n in expected]


def test_hires_prompts_get_partners_of_their_own(hooked):
    p, _ = generate(hooked, prompt="an empty room", negative_prompt="", enable_hr=True, hr_prompt="walle in space")
    assert p.all_negative_prompts == [""]
    assert p.all_hr_negative_prompts == ["walle-neg"]
    assert uncond_prompts("cached_hr_uc") == ["walle-neg"]


def test_unticked_leaves_prompts_and_says_so(hooked):
    p, processed = generate(hooked, enabled=False, prompt="walle", negative_prompt="blurry")
    assert p.all_negative_prompts == ["blurry"]
    assert "DreamArtist: off" in processed.infotexts[0]


@pytest.mark.parametrize("enabled", [True, False])
def test_pasting_the_infotext_restores_the_checkbox(hooked, enabled):
    import gradio as gr
    from modules import generation_parameters_copypaste as paste
    from modules import scripts

    _, processed = generate(hooked, enabled=enabled, prompt="walle")
    (script,) = scripts.scripts_txt2img.alwayson_scripts
    with gr.Blocks():  # the txt2img tab builds each script's controls; the runner collects infotext_fields
        checkbox, mode, pos, neg = script.ui(False)
    assert script.infotext_fields == [(checkbox, "DreamArtist auto-negative"), (mode, "DreamArtist adapters mode"),
                                      (pos, "DreamArtist phi^p"), (neg, "DreamArtist phi^n")]
    pasted = paste.paste_values(processed.infotexts[0], script.infotext_fields)
    assert pasted == [gr.update(value=enabled), gr.update(), gr.update(), gr.update()]
    assert paste.paste_values("a\nSteps: 3, Seed: 1, Size: 64x64", script.infotext_fields) == [gr.update()] * 4
    with_adapters = "a\nSteps: 3, Seed: 1, DreamArtist: walle, DreamArtist adapters: \"DA++, 0.7, 0.5\""
    assert paste.paste_values(with_adapters, script.infotext_fields) == [
        gr.update(value=True), gr.update(value="DA++"), gr.update(value=0.7), gr.update(value=0.5)]


def test_words_without_a_partner_are_ignored(hooked):
    from modules.textual_inversion.textual_inversion import Embedding

    Embedding(torch.ones(1, 32), "lonely").save(str(hooked.embeddings_dir / "lonely.pt"))
    p, processed = generate(hooked, prompt="lonely", negative_prompt="")
    assert p.all_negative_prompts == [""] and "DreamArtist" not in processed.infotexts[0]


def test_forge_pairs_come_from_its_text_engine(host_forge):
    write_pair(host_forge.embeddings_dir, "walle", width=32)
    host_forge.load_extension(REPO)
    p, processed = generate(host_forge, prompt="walle at dusk", negative_prompt="")
    assert p.all_negative_prompts == ["walle-neg"] and "DreamArtist: walle" in processed.infotexts[0]


def schedule_uses(host, prompt: str, steps: int, hires_steps=None) -> list[list[tuple[str, float]]]:
    """Per sampling step, the (embedding, weight) uses the host itself finds: its schedule, then its encoder."""
    from modules import extra_networks, prompt_parser

    from extensions_builtin_compat.host_pairing import embedding_uses, prompt_encoder

    encoder = prompt_encoder()
    prompt, _ = extra_networks.parse_prompt(prompt)
    (schedule,) = prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps)
    per_step, start = [], 1
    for end, text in schedule:
        uses = sorted((name.lower().removesuffix("-neg"), round(w, 4)) for name, w in embedding_uses(encoder, text))
        per_step += [uses] * (end - start + 1)
        start = end + 1
    return per_step


@pytest.mark.parametrize("prompt, negative", [
    ("<lora:walle:1> a robot", ""),
    ("walle2 on the moon", "walle-neg"),
    ("WALLE", "walle-neg"),
    ("((walle))", "((walle-neg))"),
    ("[walle]", "[walle-neg]"),
    ("(a walle:1.3)", "(walle-neg:1.3)"),
    ("[walle:robo:0.5]", "[walle-neg:robo-neg:0.5]"),
    ("[walle|a cat]", "[walle-neg|]"),
    ("a [walle:4] in a [room:robo:7]", "[walle-neg:4] [:robo-neg:7]"),
    ("(walle:1.2) and walle", "(walle-neg:1.2) walle-neg"),
])
def test_the_partner_follows_the_hosts_own_reading_of_the_prompt(hooked, prompt, negative):
    p, _ = generate(hooked, prompt=prompt, negative_prompt="", steps=10)
    assert p.all_negative_prompts == [negative]
    for steps, hires in ((10, None), (7, None), (10, 12)):  # every step count and the hires pass
        pos = schedule_uses(hooked, prompt, steps, hires)
        neg = schedule_uses(hooked, p.all_negative_prompts[0], steps, hires)
        assert neg == pos, (steps, hires)


def test_a_partner_spelled_in_another_case_is_found(host):
    write_pair(host.embeddings_dir, "Walle")
    (host.embeddings_dir / "Walle-neg.pt").rename(host.embeddings_dir / "walle-NEG.pt")
    host.load_extension(REPO)
    p, processed = generate(host, prompt="walle", negative_prompt="")
    assert p.all_negative_prompts == ["walle-NEG"] and "DreamArtist: Walle" in processed.infotexts[0]
