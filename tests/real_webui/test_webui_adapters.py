"""PN adapters in real webuis (A1111 and the Forge family): a pair trained with adapters through the API; in every
row layout the webui's CFG denoiser uses, phi^p acts on the cond rows and phi^n on the uncond rows (seen by the
test-only probe extension, tests/real_webui/probe, which records the row labels at one UNet and one text-encoder
adapter layer, and, in the Forge family, which chunks of each UNet call its sampler says are cond and uncond); the
exported phi^p loads in the webui's built-in Lora and changes the image; both apply together.

runs on its own:  DREAMARTIST_WEBUI_HARNESS=... .venv/bin/python -m pytest tests/real_webui/test_webui_adapters.py
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from webui_harness import FOLLOWS, REPO, parse_infotext, png_base64, skip_without_harness

skip_without_harness()

NAME = "da_adapt"
POS, NEG = [f"{NAME}:pos"], [f"{NAME}:neg"]


@pytest.fixture(scope="module")
def adapter_pair(webui, reference_image):
    reply = webui.post("/dreamartist/v1/train", {"image": png_base64(reference_image), "name": NAME, "steps": 2,
                                                 "width": 64, "height": 64, "adapters": True, "reconstruction": False,
                                                 "unet_lr_pos": 0.01, "unet_lr_neg": 0.01, "text_lr": 0.01})
    assert reply.status == 200, reply
    assert (webui.embeddings / f"{NAME}.dreamartist-lora").is_file()
    return NAME


def test_adapters_train_with_gradient_checkpointing(webui, reference_image):
    """The checkpointed blocks recompute in the backward pass, after the adapters' forward block has ended."""
    reply = webui.post("/dreamartist/v1/train", {"image": png_base64(reference_image), "name": f"{NAME}_ckpt",
                                                 "steps": 2, "width": 64, "height": 64, "adapters": True,
                                                 "reconstruction": False, "gradient_checkpointing": True})
    assert reply.status == 200, reply
    assert (webui.embeddings / f"{NAME}_ckpt.dreamartist-lora").is_file()


def rows_seen(webui, kind: str, payload: dict) -> tuple[dict, object]:
    assert webui.post("/dreamartist-probe/v1/watch", {}).status == 200
    try:
        generation = webui.generate(kind, payload)
        seen = webui.get("/dreamartist-probe/v1/rows").json()
    finally:
        webui.post("/dreamartist-probe/v1/unwatch", {})
    return seen, generation


def da(mode="pair", pos=0.8, neg=0.65):
    return {"alwayson_scripts": {"dreamartist": {"args": [True, mode, pos, neg]}}}


LAYOUTS = {  # name: (payload changes, the labels of each UNet call of one step)
    "one batched call": ({}, [[POS, NEG]]),
    "batch_cond_uncond off": ({"override_settings": {"batch_cond_uncond": False}}, [[POS], [NEG]]),
    "a prompt of other length": ({"prompt": f"{NAME} " + "word " * 80}, [[POS], [NEG]]),
    "AND prompts": ({"prompt": f"{NAME} AND a red cat"}, [[POS, POS, NEG]]),
    "batch of two": ({"batch_size": 2}, [[POS, POS, NEG, NEG]]),
}


def assert_rows_follow_the_chunks(seen: dict, images: int = 1, cond_chunks: int = 1, calls: slice = slice(None),
                                  uncond: bool = True):
    """Forge family: the rows of each UNet call carry the adapter of the branch the backend's sampler gave their chunk
    (0 cond, 1 uncond; one row per image in each chunk); each call carries the step's ``cond_chunks`` cond chunks, and
    the uncond chunk unless the sampler skipped it (Classic does on the first step); with ``uncond``, some call has
    it."""
    labelled = list(zip(seen["unet"], seen["chunks"], strict=True))[calls]
    assert labelled and all(labels for labels, _ in labelled), seen
    for labels, chunks in labelled:
        assert labels == [POS if chunk == 0 else NEG for chunk in chunks for _ in range(images)], (labels, chunks)
        assert chunks.count(0) == cond_chunks and chunks.count(1) <= 1, chunks
    assert not uncond or any(1 in chunks for _, chunks in labelled), seen


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_row_gets_its_branchs_adapter(webui, adapter_pair, layout):
    changes, per_step = LAYOUTS[layout]
    if webui.version in FOLLOWS and "batch_cond_uncond" in str(changes):
        pytest.skip(f"webui {webui.version}: its backend's sampler batches the branches by free memory, whatever "
                    "this setting says (Neo has no such setting)")
    payload = {**webui.payload(f"a photo of {NAME}", steps=2), **da(), **changes}
    seen, generation = rows_seen(webui, "txt2img", payload)
    unet = [call for call in seen["unet"] if call is not None]
    if webui.version in FOLLOWS:
        assert_rows_follow_the_chunks(seen, changes.get("batch_size", 1), 2 if "AND" in layout else 1)
    else:
        assert unet and all(call in per_step for call in unet), seen["unet"]
    # one text-encoder call per 75-token chunk: a prompt of two chunks brings [POS] twice
    assert {str(call) for call in seen["te"]} == {str([NEG]), str([POS])} or layout in ("AND prompts",
                                                                                       "batch of two")
    info = parse_infotext(generation.infotext)
    assert info.params.get("DreamArtist adapters") == "pair, 0.8, 0.65" and f"{NAME}-neg" in info.negative


def test_skipped_uncond_and_the_hires_pass(webui, adapter_pair):
    payload = {**webui.payload(NAME, steps=4), **da(), "s_min_uncond": 100.0}  # 1.6.0 ignores it as an override
    seen, _ = rows_seen(webui, "txt2img", payload)  # NGMS: the uncond rows are skipped on odd steps
    if webui.version in FOLLOWS:  # the backend's sampler decides what it skips (Classic: every step; reForge: none)
        assert_rows_follow_the_chunks(seen, uncond=False)
    else:
        assert [POS] in seen["unet"] and [POS, NEG] in seen["unet"], seen
    payload = {**webui.payload(NAME, steps=2), **da(), "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2,
               "hr_upscaler": "Latent", "denoising_strength": 0.5, "hr_prompt": "a cat"}
    if webui.version == "neo":  # no latent upscalers; its API needs the hires modules named
        payload |= {"hr_upscaler": "None", "hr_additional_modules": ["Use same choices"]}
    seen, _ = rows_seen(webui, "txt2img", payload)
    # the hires prompt has no pair: no row of its pass (Neo's hires CFG of 1 runs the cond rows alone) is labelled
    if webui.version in FOLLOWS:
        assert_rows_follow_the_chunks(seen, calls=slice(0, 2))
    else:
        assert seen["unet"][:2] == [[POS, NEG]] * 2, seen["unet"]
    assert seen["unet"][2:] and all(call and all(row == [] for row in call) for call in seen["unet"][2:]), seen


def test_img2img_and_da_plus_plus(webui, adapter_pair, reference_image):
    payload = {**webui.payload(NAME, steps=4), **da("DA++"), "init_images": [png_base64(reference_image)],
               "denoising_strength": 0.75}
    seen, generation = rows_seen(webui, "img2img", payload)
    if webui.version in FOLLOWS:
        assert_rows_follow_the_chunks(seen)
    else:
        assert seen["unet"] and all(call == [POS, NEG] for call in seen["unet"]), seen["unet"]
    info = parse_infotext(generation.infotext)
    assert f"{NAME}-neg" not in info.negative and info.params["DreamArtist adapters"] == "DA++, 0.8, 0.65"


def test_exported_phi_p_loads_in_the_builtin_lora_and_both_apply(webui, adapter_pair, tmp_path):
    lora = webui.folder / "models" / "Lora" / f"{NAME}-pos.safetensors"
    done = subprocess.run([sys.executable, "-m", "dreamartist", "export-lora", "--name", NAME, "--embeddings",
                           str(webui.embeddings), "--output", str(tmp_path / lora.name)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lora.parent.mkdir(exist_ok=True)
    shutil.copy(tmp_path / lora.name, lora)
    try:
        assert webui.post("/sdapi/v1/refresh-loras", {}).status == 200
        plain = webui.generate("txt2img", {**webui.payload("a photo", steps=2), **da("off")}).images[0]
        with_lora = webui.generate("txt2img", {**webui.payload(f"<lora:{NAME}-pos:1> a photo", steps=2),
                                               **da("off")})
        assert with_lora.images[0] != plain and f"{NAME}-pos" in with_lora.infotext  # the built-in Lora applied it
        off = webui.generate("txt2img", {**webui.payload(f"<lora:{NAME}-pos:0.7> {NAME}", steps=2), **da("off")})
        both = webui.generate("txt2img", {**webui.payload(f"<lora:{NAME}-pos:0.7> {NAME}", steps=2), **da()})
        assert both.images[0] != off.images[0]  # our adapters act beside the built-in Lora
    finally:
        lora.unlink(missing_ok=True)
        webui.post("/sdapi/v1/refresh-loras", {})
    assert "Traceback" not in webui.log_text()
