"""Prompt templates: the built-in lists, template files and filling a line."""
from __future__ import annotations

import pytest

from dreamartist.errors import InputError
from dreamartist.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, fill, load_template


def test_builtin_lists_are_the_textual_inversion_ones():
    object_lines = load_template("object")
    style_lines = load_template("Style ")
    assert len(object_lines) == 27 and len(set(object_lines)) == 27
    assert len(style_lines) == 19  # the paper's list repeats two lines; kept as published
    assert object_lines[:2] == ["a photo of a [name]", "a rendering of a [name]"]
    assert object_lines[-1] == "a photo of a small [name]"
    assert style_lines[0] == "a painting in the style of [name]"
    assert style_lines[-1] == "a large painting in the style of [name]"
    assert all("[name]" in line for line in OBJECT_TEMPLATES + STYLE_TEMPLATES)


def test_load_template_returns_a_copy():
    lines = load_template("object")
    lines.clear()
    assert len(load_template("object")) == 27


def test_template_file_skips_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("\ufeffa photo of [name], [filewords]\n\n   \n  art by [name]  \n", encoding="utf-8")
    assert load_template(str(path)) == ["a photo of [name], [filewords]", "art by [name]"]


def test_line_without_name_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a photo of [name]\n\na photo of [filewords]\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"Line 3 .*bad\.txt.*\[name\]"):
        load_template(str(path))


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_template_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="no lines"):
        load_template(str(path))


def test_unknown_template_is_an_error(tmp_path):
    with pytest.raises(InputError, match="neither 'object', 'style'"):
        load_template(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="neither"):
        load_template(str(tmp_path))  # a folder is not a template file


def test_undecodable_template_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 [name]".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        load_template(str(path))


@pytest.mark.parametrize("line, caption, expected", [
    ("a photo of a [name]", "", "a photo of a walle"),
    ("a photo of [name], [filewords]", "robot, yellow", "a photo of walle, robot, yellow"),
    ("a photo of [name], [filewords]", "", "a photo of walle"),
    ("[filewords], a photo of [name]", "", "a photo of walle"),
    ("[name], [filewords], trending", "", "walle, trending"),
    ("[name] [filewords] style", "", "walle style"),
    ("[name] and [name]", "", "walle and walle"),
])
def test_fill(line, caption, expected):
    assert fill(line, "walle", caption) == expected
