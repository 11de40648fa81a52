"""The extension in real AUTOMATIC1111 webuis: installed by git clone, trained through its tab in chromium and through
its HTTP API, used in txt2img/img2img, next to the webui's own Train tab, across a restart, with a clean log."""
from __future__ import annotations

import io
import math
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePath

import pytest
from webui_harness import (
    BASELINE,
    NO_WEBUI_TI,
    PAIR,
    one_sentence,
    parse_infotext,
    png_base64,
    skip_without_harness,
    word_pattern,
)

skip_without_harness()

TAB_PAIR, STOPPED_PAIR = "da_tab", "da_stop"
PAGE_TIMEOUT_MS = 180_000
TRAIN_TIMEOUT_S = 1800  # a 4-step run with 2 previews takes minutes on two busy cores

# Lines of the webui's own start-up and of its own code paths that this suite triggers, which the log check
# ignores; each is the webui's (or its libraries') doing on this CPU-only, offline harness, not the extension's.
KNOWN_NOISE = [
    # lightning_fabric imports pkg_resources; torch deprecates torch.jit.script/interface; huggingface_hub
    # deprecates resume_download (all emitted while the webui imports ldm/open_clip/transformers)
    r"UserWarning: pkg_resources is deprecated",
    r"__import__\(\"pkg_resources\"\)",
    r"FutureWarning: `torch\.jit\.(script|interface)` is deprecated",
    r"FutureWarning: `resume_download` is deprecated",
    r"^\s*warnings\.warn\($",
    # no xformers and no NVIDIA driver on a CPU machine
    r"[Nn]o module 'xformers'",
    r"^Warning: caught exception 'Found no NVIDIA driver",
    # the webui's own textual-inversion training (test_webui_textual_inversion_still_trains) on torch 2.x:
    # torch.cuda.amp.GradScaler() is deprecated, and disabled without CUDA
    r"FutureWarning: `torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
    r"UserWarning: torch\.cuda\.amp\.GradScaler is enabled, but CUDA is not available",
    r"^\s*scaler = torch\.cuda\.amp\.GradScaler\(\)$",
    r"^\s*warnings\.warn\(\"torch\.cuda\.amp\.GradScaler is enabled",
    # the webui's own "sdp-no-mem" attention optimisation (test_webui_baret.py sets it) on torch 2.x
    r"FutureWarning: `torch\.backends\.cuda\.sdp_kernel\(\)` is deprecated",
    # a stock reForge here: its banner about the harness's ~/.cache path (a leading dot), a deprecation in its
    # sd_models.py, and the SD1.5 checkpoint's CLIP-L without text_projection (a key reForge's loader expects)
    r"^!+ Warning !+$",
    r"FutureWarning: `torch\.distributed\.reduce_op` is deprecated",
    r"^WARNING:root:Text encoder missing keys: \['clip_l\.text_projection'\]$",
    # a stock Forge Neo on a CPU-only machine: no NVIDIA driver; and its built-in Lora logs test_webui_pairing.py's
    # lora_tag_only case (<lora:dapair:1>, which does not exist) as an error where A1111 notes it in the infotext
    r"Found no NVIDIA driver on your system\.\s+memmon\.py :: WARNING",
    r'^Failed to load LoRA: "dapair"\s+networks\.py :: ERROR',
]
# Whole tracebacks of the host's own, removed before the lines are read: reForge's Lora fails on a LoRA that does not
# exist (its error report reads the missing file's name), which test_webui_pairing.py's lora_tag_only case asks for
KNOWN_NOISE_BLOCKS = [
    # a stock Forge Neo: its built-in scripts fail on an API request that arrives before its UI has given them their
    # arguments (the harness's warm-up right after start-up, now and then)
    r"^\*\*\* Error running process(?:_batch)?: \S+/extensions-builtin/sd_forge_\w+/scripts/\w+\.py\n"
    r"(?:    .*\n)*?    TypeError: \w+\.process(?:_batch)?\(\) missing \d+ required positional arguments?: .*$",
    r"^activating extra network lora with arguments .*?: AttributeError\n(?:.*\n)*?.*errors\.display\(e, "
    r"f\"loading network \{network_on_disk\.filename\}\"\)\n.*\nAttributeError: 'NoneType' object has no attribute "
    r"'filename'$",
]
SUSPECT = re.compile(r"traceback|error|warn|dreamartist", re.IGNORECASE)


def result_text(page) -> str:
    result = page.locator("#dreamartist_result .prose")
    return result.first.inner_text().strip() if result.count() else ""


def progress_text(page) -> str:
    progress = page.locator("#dreamartist_progress .prose")
    return progress.first.inner_text().strip() if progress.count() else ""


def result_ready(page) -> bool:
    return bool(result_text(page)) and not page.locator("#dreamartist_result.dreamartist-stale").count()


def fill_form(page, reference_png, name: str, steps: int, preview_every: int) -> None:
    from playwright.sync_api import expect

    page.locator("#dreamartist_reference input[type=file]").set_input_files(str(reference_png))
    expect(page.locator("#dreamartist_reference img").first).to_be_visible()
    page.locator("#dreamartist_name :is(input, textarea)").fill(name)
    for control, value in (("steps", steps), ("width", 64), ("height", 64), ("preview_every", preview_every)):
        box = page.locator(f"#dreamartist_{control} input[type=number]")
        box.fill(str(value))
        box.press("Enter")


def wait_for_result(page, timeout_s: float = TRAIN_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result_ready(page):
            return result_text(page)
        page.wait_for_timeout(1000)
    raise AssertionError(f"no result after {timeout_s} s; result line: {result_text(page)!r}; "
                         f"progress: {progress_text(page)!r}")


def file_step(path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def assert_uses_pair(generation, name: str) -> None:
    """The infotext, the info JSON and the PNG's "parameters" say that NAME-neg went to the negative prompt."""
    info = parse_infotext(generation.infotext)
    assert info.params.get("DreamArtist") == name, generation.infotext
    assert word_pattern(f"{name}-neg").search(info.negative), generation.infotext
    assert "blurry" in info.negative, generation.infotext  # the user's own negative prompt is kept
    assert generation.info["extra_generation_params"].get("DreamArtist") == name
    assert generation.info["all_negative_prompts"][0] == info.negative
    assert generation.png_parameters() == generation.infotext


# -- install ----------------------------------------------------------------------------------------------------------

def test_install_script_installs_nothing(webui):
    assert webui.install_rc == 0, webui.install_output
    assert webui.install_output == "", webui.install_output
    assert webui.packages_after == webui.packages_before


# -- the tab in chromium --------------------------------------------------------------------------------------------

@dataclass
class Tab:
    page: object  # playwright's Page
    errors: list[str] = field(default_factory=list)  # uncaught JavaScript errors of the page


@pytest.fixture
def tab(browser, webui):
    """A fresh page of the webui, on the DreamArtist tab."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    opened = Tab(page)
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        page.goto(webui.url, wait_until="domcontentloaded")
        page.locator("#tabs > .tab-nav button", has_text="DreamArtist").click()
        page.locator("#dreamartist_train").wait_for(state="visible")
        page.wait_for_timeout(1000)
        yield opened
    finally:
        page.close()


def test_tab_trains_a_pair(tab, webui, reference_png, output_dir):
    from playwright.sync_api import expect

    page = tab.page
    fill_form(page, reference_png, TAB_PAIR, steps=4, preview_every=2)
    page.screenshot(path=str(output_dir / f"{webui.tag}-tab-before.png"), full_page=True)
    page.locator("#dreamartist_train").click()
    saw_bar = saw_step = saw_live_preview = False
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while not result_ready(page) and time.monotonic() < deadline:
        saw_bar = saw_bar or page.locator(".progressDiv").count() > 0
        if not saw_step and re.search(r"DreamArtist: step \d+/4", progress_text(page)):
            saw_step = True
            page.screenshot(path=str(output_dir / f"{webui.tag}-tab-during.png"), full_page=True)
        if not saw_live_preview and page.locator("#dreamartist_gallery .livePreview img").count():
            saw_live_preview = True
            page.screenshot(path=str(output_dir / f"{webui.tag}-tab-during-preview.png"), full_page=True)
        page.wait_for_timeout(500)
    try:
        text = wait_for_result(page, 60)
        page.wait_for_timeout(1500)  # let the gallery and the loss plot render
    finally:
        page.screenshot(path=str(output_dir / f"{webui.tag}-tab-after.png"), full_page=True)

    assert f"Type {TAB_PAIR} in your prompt; {TAB_PAIR}-neg is added to the negative prompt automatically." in text
    assert "Trained 4 steps" in text, text
    assert f"Saved: {TAB_PAIR}.pt, {TAB_PAIR}-neg.pt." in text, text
    assert saw_bar, "the webui's progress bar (.progressDiv) never showed"
    assert saw_step, "the progress line never showed a DreamArtist step"
    assert saw_live_preview, "no live preview showed in the gallery during training"
    expect(page.locator(".progressDiv")).to_have_count(0)
    assert page.locator("#dreamartist_gallery img").count() >= 2, "the gallery does not show the 2 previews"
    expect(page.locator("#dreamartist_loss polyline")).to_be_attached()
    expect(page.locator("#dreamartist_loss .prose")).to_contain_text("loss over 4 steps")
    for name in (TAB_PAIR, f"{TAB_PAIR}-neg"):
        assert file_step(webui.embeddings / f"{name}.pt") == 4
    assert tab.errors == []


def test_tab_interrupt_keeps_the_last_good_pair(tab, webui, reference_png, output_dir):
    page = tab.page
    fill_form(page, reference_png, STOPPED_PAIR, steps=200, preview_every=0)
    page.locator("#dreamartist_train").click()
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while not result_ready(page) and time.monotonic() < deadline:
        step = re.search(r"DreamArtist: step (\d+)/200", progress_text(page))
        if step and int(step.group(1)) >= 2:
            break
        page.wait_for_timeout(500)
    assert not result_ready(page), f"the run ended before it could be interrupted: {result_text(page)!r}"
    page.screenshot(path=str(output_dir / f"{webui.tag}-tab-before-interrupt.png"), full_page=True)
    page.locator("#dreamartist_interrupt").click()
    try:
        text = wait_for_result(page, 300)
        page.wait_for_timeout(1000)
    finally:
        page.screenshot(path=str(output_dir / f"{webui.tag}-tab-interrupted.png"), full_page=True)

    done = re.search(r"Trained (\d+) of 200 steps \(interrupted\)", text)
    assert done, text
    steps = int(done.group(1))
    assert 2 <= steps < 200, text
    assert f"Saved: {STOPPED_PAIR}.pt, {STOPPED_PAIR}-neg.pt." in text, text
    for name in (STOPPED_PAIR, f"{STOPPED_PAIR}-neg"):
        assert file_step(webui.embeddings / f"{name}.pt") == steps
    assert tab.errors == []


# -- the HTTP API ----------------------------------------------------------------------------------------------------

def test_api_trains_a_pair(webui, trained_pair):
    assert trained_pair.status == 200, trained_pair.body
    body = trained_pair.body
    assert body["name"] == PAIR and body["negative_name"] == f"{PAIR}-neg"
    assert body["steps"] == 4 and body["stopped"] == ""
    assert isinstance(body["final_loss"], float) and math.isfinite(body["final_loss"])
    assert all(file == PurePath(file).name for file in body["files"]), f"server paths in {body['files']}"
    assert {f"{PAIR}.pt", f"{PAIR}-neg.pt"} <= set(body["files"])
    for name in (PAIR, f"{PAIR}-neg"):
        assert file_step(webui.embeddings / f"{name}.pt") == 4


def test_api_lists_the_pairs(webui, trained_pair):
    reply = webui.get("/dreamartist/v1/pairs")
    assert reply.status == 200, reply
    assert PAIR in reply.json()["pairs"]


@pytest.mark.parametrize("name", [PAIR, PAIR.upper()])
def test_api_refuses_a_taken_name(webui, trained_pair, reference_image, name):
    reply = webui.post("/dreamartist/v1/train", {"image": png_base64(reference_image), "name": name, "steps": 2,
                                                 "width": 64, "height": 64})
    assert reply.status == 409, reply
    assert one_sentence(reply.detail), reply


BAD_REQUESTS = {
    "bad_base64": ({"image": "this is not base64!"}, None),
    "not_an_image": ({"image": "aGVsbG8gd29ybGQ="}, None),
    "missing_image": ({"image": None}, None),
    "missing_name": ({"name": None}, None),
    "unknown_field": ({"colour": "red"}, None),
    "gamma_not_a_number": ({"gamma": "abc"}, None),
    "zero_steps": ({"steps": 0}, None),
    "width_not_multiple_of_8": ({"width": 100}, None),
    "transparent_mask": ({"mask": "CLEAR"}, None),  # read over white it was a white mask: trained as weight 5
    "resume_of_nothing": ({"resume": True}, None),
    "json_array": (None, b"[1, 2]"),
    "not_json": (None, b"this is not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_api_rejects_bad_input(webui, reference_image, case):
    changes, raw = BAD_REQUESTS[case]
    body = None
    if raw is None:
        body = {"image": png_base64(reference_image), "name": "da_bad", "steps": 2, "width": 64, "height": 64}
        body.update(changes)
        body = {key: value for key, value in body.items() if value is not None}
        if body.get("mask") == "CLEAR":
            from PIL import Image

            body["mask"] = png_base64(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    reply = webui.post("/dreamartist/v1/train", body, raw=raw)
    assert 400 <= reply.status < 500, reply
    assert one_sentence(reply.detail), reply
    assert not (webui.embeddings / "da_bad.pt").exists()
    assert not (webui.embeddings / ".dreamartist" / "da_bad.lock").exists()


def test_api_resume_continues_from_the_saved_step(webui, trained_pair, reference_image):
    import torch

    pos = webui.embeddings / f"{PAIR}.pt"
    assert file_step(pos) == 4
    before = torch.load(pos, map_location="cpu", weights_only=True)["string_to_param"]["*"]
    body = {"image": png_base64(reference_image), "name": PAIR, "width": 64, "height": 64, "resume": True}
    again = webui.post("/dreamartist/v1/train", {**body, "steps": 4})  # nothing left to do: says so
    assert 400 <= again.status < 500 and one_sentence(again.detail) and "4" in again.detail, again
    reply = webui.post("/dreamartist/v1/train", {**body, "steps": 6})
    assert reply.status == 200, reply
    assert reply.json()["steps"] == 6 and reply.json()["stopped"] == ""
    assert file_step(pos) == 6 and file_step(webui.embeddings / f"{PAIR}-neg.pt") == 6
    after = torch.load(pos, map_location="cpu", weights_only=True)["string_to_param"]["*"]
    assert not torch.equal(before, after)


# -- generation ----------------------------------------------------------------------------------------------------

def test_txt2img_uses_the_pair(webui, trained_pair):
    generation = webui.generate("txt2img", webui.payload(f"a photo of {PAIR}", "blurry"))
    assert_uses_pair(generation, PAIR)


def test_img2img_uses_the_pair(webui, trained_pair, reference_image):
    payload = webui.payload(f"a photo of {PAIR}", "blurry", init_images=[png_base64(reference_image)],
                                    denoising_strength=0.6)
    assert_uses_pair(webui.generate("img2img", payload), PAIR)


def test_generations_are_unchanged_after_training(webui, trained_pair):
    """The same seed and prompt (without the pair) give the same pixels before any training and after it."""
    from PIL import Image, ImageChops

    after = webui.generate("txt2img", webui.payload(**BASELINE)).images[0]
    with Image.open(io.BytesIO(webui.baseline)) as first, Image.open(io.BytesIO(after)) as second:
        first, second = first.convert("RGB"), second.convert("RGB")
        assert first.size == second.size
        if first.tobytes() != second.tobytes():
            changed = sum(1 for pixel in ImageChops.difference(first, second).getdata() if any(pixel))
            pytest.fail(f"{changed} of {first.width * first.height} pixels differ from the image generated "
                        "before training")


# -- the webui's own textual-inversion training -------------------------------------------------------------------

def ti_request(webui, name: str, data_root, log_directory, steps: int, size: int) -> dict:
    """/sdapi/v1/train/embedding takes every argument of the webui's textual_inversion.train_embedding (whose names
    differ between versions); no previews, a save point beyond the end (so that the webui creates its log folder),
    the stock subject template."""
    wanted = dict(id_task=f"task(dreamartist-e2e-{name})", embedding_name=name, learn_rate="0.005", batch_size=1,
                  gradient_step=1, data_root=str(data_root), log_directory=str(log_directory),
                  training_width=size, training_height=size, varsize=False, steps=steps, clip_grad_mode="disabled",
                  clip_grad_value="0.1", shuffle_tags=False, tag_drop_out=0, latent_sampling_method="once",
                  use_weight=False, create_image_every=0, save_embedding_every=100_000,
                  template_filename="subject.txt", save_image_with_stored_embedding=False,
                  preview_from_txt2img=False, preview_prompt="", preview_negative_prompt="", preview_steps=20,
                  preview_sampler_name="Euler", preview_sampler_index=0, preview_cfg_scale=7, preview_seed=-1,
                  preview_width=size, preview_height=size)
    parameters = webui.parameters_of("modules/textual_inversion/textual_inversion.py", "train_embedding")
    missing = set(parameters) - set(wanted)
    assert not missing, f"this webui's train_embedding also takes {sorted(missing)}"
    return {key: wanted[key] for key in parameters}


def train_textual_inversion(webui, name: str, data_root, log_directory, steps: int, size: int):
    created = webui.post("/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 1,
                                                        "overwrite_old": True, "init_text": "*"})
    assert created.status == 200 and "create embedding filename" in created.json()["info"], created
    reply = webui.post("/sdapi/v1/train/embedding", ti_request(webui, name, data_root, log_directory, steps, size))
    assert reply.status == 200 and "train embedding complete" in reply.json()["info"], reply
    assert "error: None" in reply.json()["info"], reply
    return reply


@pytest.fixture(scope="session")
def ti_folders(tmp_path_factory, reference_image):
    from PIL import Image

    data = tmp_path_factory.mktemp("ti-data")
    reference_image.save(data / "reference.png")
    reference_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "mirrored.png")
    return data, tmp_path_factory.mktemp("ti-log")


def test_webui_textual_inversion_still_trains(webui, trained_pair, ti_folders):
    train_textual_inversion(webui, "da_ti", *ti_folders, steps=2, size=64)


def post_timing_steps(webui, path: str, payload: dict):
    """POST a training request while polling /sdapi/v1/progress: (reply, seconds between consecutive step counts
    (shared.state.job_no, which both trainers advance once per optimiser step))."""
    replies = []
    worker = threading.Thread(target=lambda: replies.append(webui.post(path, payload)))
    worker.start()
    seen: dict[int, float] = {}
    started = False  # until the run resets job_no to 0, the progress API still shows the previous run's count
    while worker.is_alive():
        reply = webui.get("/sdapi/v1/progress?skip_current_image=true", timeout=30)
        if reply.status == 200:
            job_no = reply.json()["state"]["job_no"]
            started = started or job_no == 0
            if started:
                seen.setdefault(job_no, time.monotonic())
        time.sleep(0.2)
    worker.join()
    steps = sorted(step for step in seen if step > 0)
    return replies[0], [seen[b] - seen[a] for a, b in zip(steps, steps[1:]) if b == a + 1]


def test_step_time_dreamartist_vs_textual_inversion(webui, reference_image, ti_folders, output_dir, capsys):
    """Seconds per training step of DreamArtist and of the webui's own textual inversion (where it has one), in the
    same webui at the same size: the median time between consecutive steps of a 5-step run, as the progress API
    reports them (so start-up work and the final save do not count). Printed only; the machine's other load shows
    in it. One run over several webuis puts each host's DreamArtist step beside A1111's."""
    steps, rows, failures = 5, [], []
    for size in (64, 128):
        reply, dreamartist = post_timing_steps(webui, "/dreamartist/v1/train", {
            "image": png_base64(reference_image), "name": f"da_time_{size}", "steps": steps, "width": size,
            "height": size})
        if reply.status != 200:
            failures.append(f"DreamArtist at {size} px: {reply}")
        timed = [("DreamArtist", dreamartist)]
        if webui.version not in NO_WEBUI_TI:
            name = f"da_time_ti_{size}"
            created = webui.post("/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 1,
                                                                "overwrite_old": True, "init_text": "*"})
            assert created.status == 200, created
            reply, inversion = post_timing_steps(webui, "/sdapi/v1/train/embedding",
                                                 ti_request(webui, name, *ti_folders, steps=steps, size=size))
            if "error: None" not in reply.json().get("info", ""):
                failures.append(f"textual inversion at {size} px: {reply}")
            timed.append(("textual inversion", inversion))
        for method, intervals in timed:
            median = f"{statistics.median(intervals):7.2f} s/step" if intervals else "    (no steps seen)"
            rows.append(f"{webui.tag}  {size:4d} px  {method:18s} {median}   "
                        f"(steps {', '.join(f'{t:.1f}' for t in intervals)} s)")
    report = "\n".join(rows)
    (output_dir / f"timings-{webui.tag}.txt").write_text(report + "\n")
    with capsys.disabled():
        print(f"\nTraining step time, webui {webui.version} on this machine's CPU:\n{report}")
    assert not failures, failures


# -- restart and log ------------------------------------------------------------------------------------------------

@pytest.mark.webui_phase(1)
def test_restart_keeps_the_pair(webui, trained_pair):
    webui.restart()
    reply = webui.get("/dreamartist/v1/pairs")
    assert reply.status == 200 and PAIR in reply.json()["pairs"], reply
    generation = webui.generate("txt2img", webui.payload(f"a photo of {PAIR}", "blurry"))
    assert_uses_pair(generation, PAIR)


@pytest.mark.webui_phase(2)
def test_log_has_no_errors_and_no_extension_warnings(webui):
    noise = re.compile("|".join(f"(?:{pattern})" for pattern in KNOWN_NOISE))
    text = webui.log_text()
    for block in KNOWN_NOISE_BLOCKS:
        text = re.sub(block, "", text, flags=re.MULTILINE)
    offending = [line for line in text.splitlines()
                 if (SUSPECT.search(line) or webui.extension.name in line) and not noise.search(line)]
    assert offending == [], "\n".join(offending[:60])
