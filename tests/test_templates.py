"""Prompt templates: the built-in lists, template files and filling a line."""
from __future__ import annotations

import pytest

from dreamartist.errors import InputError
from dreamartist.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, fill, read_template_file, template_lines


def test_builtin_lists_are_the_textual_inversion_ones():
    object_lines = template_lines("object")
    style_lines = template_lines("Style ")
    assert len(object_lines) == 27 and len(set(object_lines)) == 27
    assert len(style_lines) == 19  # the paper's list repeats two lines; kept as published
    assert object_lines[:2] == ("a photo of a [name]", "a rendering of a [name]")
    assert object_lines[-1] == "a photo of a small [name]"
    assert style_lines[0] == "a painting in the style of [name]"
    assert style_lines[-1] == "a large painting in the style of [name]"
    assert all("[name]" in line for line in OBJECT_TEMPLATES + STYLE_TEMPLATES)


def test_inline_template_text_skips_blank_lines():
    text = "a photo of [name], [filewords]\n\n   \n  art by [name]  \n"
    assert template_lines(text) == ("a photo of [name], [filewords]", "art by [name]")


def test_a_path_is_template_text_not_a_file_to_read(tmp_path):
    """The tab and the API never read a file a request names: a path is just a line without [name]."""
    secret = tmp_path / "secret.txt"
    secret.write_text("a photo of [name]\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"line 1 .*has no \[name\]") as caught:
        template_lines(str(secret))
    assert "a photo of" not in str(caught.value)


def test_line_without_name_is_an_error_naming_the_line():
    with pytest.raises(InputError, match=r"line 3 \('a photo of \[filewords\]'\) has no \[name\]"):
        template_lines("a photo of [name]\n\na photo of [filewords]\n")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_template_is_an_error(content):
    with pytest.raises(InputError, match="template is empty"):
        template_lines(content)


def test_the_command_line_reads_its_own_template_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("\ufeffa photo of [name]\n", encoding="utf-8")
    assert template_lines(read_template_file(path)) == ("a photo of [name]",)
    assert read_template_file(" object") == "object"
    with pytest.raises(InputError, match="neither 'object', 'style'"):
        read_template_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="neither"):
        read_template_file(tmp_path)  # a folder is not a template file
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 [name]".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        read_template_file(latin)


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
