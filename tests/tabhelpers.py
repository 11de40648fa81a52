"""Helpers for the tab, API, script-loading and browser tests: load the extension into a stand-in host,
build its tab the way the webui does, and find controls and event handlers in it."""
from __future__ import annotations

import io
import re
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


def load_extension(host) -> list:
    """Load scripts/*.py as the webui does and fail on any error it reported."""
    modules = host.load_extension(REPO)
    assert host.module("modules.errors").reported == []
    return modules


def build_tab(host) -> gr.Blocks:
    """Run the on_ui_tabs callbacks (outside any Blocks, as ui.create_ui does) and return our tab."""
    tabs = host.module("modules.script_callbacks").ui_tabs_callback()
    assert [(title, tab_id) for _, title, tab_id in tabs] == [("DreamArtist", "dreamartist")]
    assert host.module("modules.errors").reported == []
    return tabs[0][0]


def webui_demo(tab: gr.Blocks) -> gr.Blocks:
    """The tab rendered inside a page the way the webui renders extension tabs."""
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tabs():
            with gr.TabItem("DreamArtist", id="dreamartist", elem_id="tab_dreamartist"):
                tab.render()
    return demo


def by_elem_id(blocks: gr.Blocks) -> dict:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def click_handler(blocks: gr.Blocks, elem_id: str):
    """(fn, dependency) of the click event on the component with ``elem_id``."""
    component = by_elem_id(blocks)[elem_id]
    for fn, dep in zip(blocks.fns, blocks.dependencies, strict=True):
        if component._id in dep["targets"] and dep["trigger"] == "click":
            return fn.fn, dep
    raise AssertionError(f"no click handler on {elem_id}")


def reference_image(size: int = 64) -> Image.Image:
    """A small picture with some structure: a red disc on a blue ground."""
    image = Image.new("RGB", (size, size), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def plain_text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()
