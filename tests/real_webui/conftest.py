"""Fixtures for the end-to-end tests against real webuis: one webui per version for the whole session (the
extension installed, started once, stopped and cleaned up at the end), a browser, a trained pair shared by tests.

Tests run version by version; within a version, tests marked ``webui_phase(n)`` run after the unmarked ones
(phase 0), in increasing n: the restart and then the log check come last.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from webui_harness import (
    BASELINE,
    ENV_OUTPUT,
    FOLLOWS,
    FORGE_ENGINE,
    NO_WEBUI_TI,
    PAIR,
    WebUI,
    png_base64,
    selected_versions,
    skip_reason,
    webui_folder,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
_output: list[Path] = []
_installed: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "webui_phase(n): run after the tests of lower phases of the same webui")


def _versions() -> list[str]:
    return [] if skip_reason() else selected_versions()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Order this folder's tests by webui version (pytest groups them so already), then by phase; the positions
    of other tests are left alone."""
    here = Path(__file__).parent
    order = {version: i for i, version in enumerate(_versions())}
    ours = [i for i, item in enumerate(items) if here in Path(str(item.path)).parents]

    def key(item):
        callspec = getattr(item, "callspec", None)
        marker = item.get_closest_marker("webui_phase")
        return order.get(callspec.params.get("webui") if callspec else None, -1), marker.args[0] if marker else 0

    for position, item in zip(ours, sorted((items[i] for i in ours), key=key)):
        items[position] = item


def pytest_terminal_summary(terminalreporter):
    for line in _installed:
        terminalreporter.write_line(f"real webui tests: {line}")
    if _output:
        terminalreporter.write_line(f"real webui tests: screenshots, webui logs and timings in {_output[0]}")


FORGE_TESTS = "test_webui_forge.py"  # for the hosts whose engines read embeddings at model load (FORGE_ENGINE)
# the webui's own textual inversion (the step-time test times DreamArtist alone where there is none)
WEBUI_TI_TESTS = ("test_webui_textual_inversion_still_trains",)

def pytest_runtest_setup(item):
    """What a host cannot run is skipped with the reason, before any of the test's fixtures (a trained pair)."""
    callspec = getattr(item, "callspec", None)
    version = callspec.params.get("webui") if callspec else None
    name = Path(str(item.path)).name
    if version in NO_WEBUI_TI and item.originalname in WEBUI_TI_TESTS:
        pytest.skip(f"webui {version}: no textual-inversion training of its own: {NO_WEBUI_TI[version]}")
    if version is not None and version not in FORGE_ENGINE and name == FORGE_TESTS:
        pytest.skip(f"webui {version} reads the embeddings folder without a model reload: {FORGE_TESTS} is for "
                    f"{', '.join(sorted(FORGE_ENGINE))}")


@pytest.fixture(scope="session")
def output_dir() -> Path:
    chosen = os.environ.get(ENV_OUTPUT, "").strip()
    folder = Path(chosen).expanduser() if chosen else Path(tempfile.mkdtemp(prefix="dreamartist-webui-"))
    folder.mkdir(parents=True, exist_ok=True)
    _output[:] = [folder]
    return folder


@pytest.fixture(scope="session")
def reference_image():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    return image


@pytest.fixture(scope="session")
def reference_png(reference_image, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "reference.png"
    reference_image.save(path)
    return path


@pytest.fixture(scope="session", params=_versions(), ids=lambda v: v if v in FOLLOWS else f"v{v}")
def webui(request, output_dir):
    """The harness webui of this version with the extension installed and the model loaded."""
    version = request.param
    folder = webui_folder(version)
    if not (folder / "start.sh").is_file():
        pytest.skip(f"the harness has no webui {version} ({folder})")
    instance = WebUI(version, folder, output_dir)
    instance.prepare()
    _installed.append(f"webui {version}: extension {instance.installed_revision()}")
    try:
        instance.start()
        instance.baseline = instance.generate("txt2img", instance.payload(**BASELINE)).images[0]
        yield instance
    finally:
        instance.stop()
        removed = instance.cleanup()
        (output_dir / "logs").mkdir(exist_ok=True)
        (output_dir / "logs" / f"removed-{instance.tag}.txt").write_text("".join(f"{p}\n" for p in removed))


@pytest.fixture(scope="session")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@dataclass
class TrainedPair:
    name: str
    status: int
    body: dict | str


@pytest.fixture(scope="session")
def trained_pair(webui, reference_image) -> TrainedPair:
    """NAME / NAME-neg trained through the API (4 steps, 64 px). Tests that only use the pair go on when its files
    were written even if the call failed afterwards; test_api_trains_a_pair checks the call itself."""
    reply = webui.post("/dreamartist/v1/train", {"image": png_base64(reference_image), "name": PAIR, "steps": 4,
                                                 "width": 64, "height": 64})
    try:
        body = reply.json()
    except ValueError:
        body = reply.body.decode(errors="replace")
    if not all((webui.embeddings / f"{name}.pt").is_file() for name in (PAIR, f"{PAIR}-neg")):
        pytest.fail(f"training {PAIR} through the API wrote no pair: {reply}")
    return TrainedPair(PAIR, reply.status, body)
