"""The tab in a real browser: the page the webui would serve (tab, progress API, injected JS and CSS), driven
by chromium: upload a reference, set a name and a few steps, train, watch progress, read the result line."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

import gradio
import pytest
from tabhelpers import REPO, build_tab, load_extension, reference_image, webui_demo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOT = Path(os.environ.get("DREAMARTIST_SCREENSHOT", "/tmp/dreamartist_tab.png"))
HOST_ASSETS = REPO / "tests" / "fakehost" / "js"  # stand-ins for the webui's script.js, progressbar.js, style.css

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"{CHROMIUM} is not installed "
                                "(apt-get install -y chromium); CI installs it")


@contextlib.contextmanager
def webui_page_assets():
    """Inject script.js, the extensions' javascript/*.js and style.css into every page, as the webui does by
    wrapping gradio's TemplateResponse (<script> before </head>, <style> before </body>)."""
    js = [HOST_ASSETS / "script.js", HOST_ASSETS / "progressbar.js", *sorted((REPO / "javascript").glob("*.js"))]
    scripts = "".join(f"<script>{path.read_text()}</script>" for path in js)
    style = "".join(f"<style>{path.read_text()}</style>" for path in (HOST_ASSETS / "host.css", REPO / "style.css"))
    original = gradio.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        response = original(*args, **kwargs)
        response.body = response.body.replace(b"</head>", scripts.encode() + b"</head>")
        response.body = response.body.replace(b"</body>", style.encode() + b"</body>")
        response.init_headers()
        return response

    gradio.routes.templates.TemplateResponse = template_response
    try:
        yield
    finally:
        gradio.routes.templates.TemplateResponse = original


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_tab(host_v1101, monkeypatch):
    """The DreamArtist tab served on localhost with the stand-in webui behind it; yields its URL."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    load_extension(host_v1101)
    demo = webui_demo(build_tab(host_v1101))
    demo.queue(64)
    with webui_page_assets():
        app, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                  quiet=True)
        host_v1101.module("modules.progress").setup_progress_api(app)
        try:
            yield url
        finally:
            queue_lock = host_v1101.module("modules.call_queue").queue_lock
            for _ in range(600):  # let a training the test started finish (up to a minute) before the host goes
                if queue_lock.acquire(blocking=False):  # the webui's FIFOLock takes no timeout
                    queue_lock.release()
                    break
                time.sleep(0.1)
            demo.close()


def test_train_from_the_browser(served_tab, host_v1101, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    reference = tmp_path / "reference.png"
    reference_image(96).save(reference)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.set_default_timeout(30_000)
            page.goto(served_tab, wait_until="domcontentloaded")
            page.locator("#dreamartist_reference input[type=file]").set_input_files(str(reference))
            expect(page.locator("#dreamartist_reference img")).to_be_visible()
            page.locator("#dreamartist_name :is(input, textarea)").fill("walle")
            for control, value in (("steps", "12"), ("width", "64"), ("height", "64"), ("preview_every", "6")):
                page.locator(f"#dreamartist_{control} input[type=number]").fill(value)
            page.locator("#dreamartist_train").click()

            expect(page.locator(".progressDiv")).to_be_attached()  # the webui progress bar, before the result
            expect(page.locator("#dreamartist_result.dreamartist-stale")).to_be_attached()  # faded meanwhile
            # gradio repeats a gr.HTML's elem_id on its inner .prose element
            expect(page.locator("#dreamartist_progress .prose")).to_contain_text("DreamArtist: step")
            result = page.locator("#dreamartist_result .prose")
            expect(result).to_contain_text(
                "Type walle in your prompt; walle-neg is added to the negative prompt automatically.", timeout=60_000)
            expect(result).to_contain_text("Trained 12 steps")
            expect(page.locator(".progressDiv")).to_have_count(0)
            expect(page.locator("#dreamartist_result.dreamartist-stale")).to_have_count(0)
            expect(page.locator("#dreamartist_progress .prose")).to_have_text("")
            expect(page.locator("#dreamartist_gallery img").first).to_be_visible()
            expect(page.locator("#dreamartist_loss polyline")).to_be_attached()
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert (host_v1101.embeddings_dir / "walle.pt").is_file()
    assert (host_v1101.embeddings_dir / "walle-neg.pt").is_file()
