"""Prompt templates: the built-in object and style lists, template files, and filling a line.

Every line holds ``[name]`` (the pseudo-word) and may hold ``[filewords]`` (the reference's caption), the
placeholders of the webui's textual-inversion template files.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

NAME = "[name]"
FILEWORDS = "[filewords]"

# imagenet_templates_small of the textual-inversion paper (Gal et al. 2022).
OBJECT_TEMPLATES = (
    "a photo of a [name]",
    "a rendering of a [name]",
    "a cropped photo of the [name]",
    "the photo of a [name]",
    "a photo of a clean [name]",
    "a photo of a dirty [name]",
    "a dark photo of the [name]",
    "a photo of my [name]",
    "a photo of the cool [name]",
    "a close-up photo of a [name]",
    "a bright photo of the [name]",
    "a cropped photo of a [name]",
    "a photo of the [name]",
    "a good photo of the [name]",
    "a photo of one [name]",
    "a close-up photo of the [name]",
    "a rendition of the [name]",
    "a photo of the clean [name]",
    "a rendition of a [name]",
    "a photo of a nice [name]",
    "a good photo of a [name]",
    "a photo of the nice [name]",
    "a photo of the small [name]",
    "a photo of the weird [name]",
    "a photo of the large [name]",
    "a photo of a cool [name]",
    "a photo of a small [name]",
)

# imagenet_style_templates_small of the same paper.
STYLE_TEMPLATES = (
    "a painting in the style of [name]",
    "a rendering in the style of [name]",
    "a cropped painting in the style of [name]",
    "the painting in the style of [name]",
    "a clean painting in the style of [name]",
    "a dirty painting in the style of [name]",
    "a dark painting in the style of [name]",
    "a picture in the style of [name]",
    "a cool painting in the style of [name]",
    "a close-up painting in the style of [name]",
    "a bright painting in the style of [name]",
    "a cropped painting in the style of [name]",
    "a good painting in the style of [name]",
    "a close-up painting in the style of [name]",
    "a rendition in the style of [name]",
    "a nice painting in the style of [name]",
    "a small painting in the style of [name]",
    "a weird painting in the style of [name]",
    "a large painting in the style of [name]",
)

BUILTIN_TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def template_lines(spec: str) -> tuple[str, ...]:
    """The lines of a built-in template ('object', 'style') or of template text given inline, one line each
    (blank lines skipped). Never a file: the tab and the API take the text itself; the command line reads its
    own --template file with ``read_template_file``. A line without [name] would train nothing, so it is an error
    naming the line."""
    key = spec.strip()
    if key.lower() in BUILTIN_TEMPLATES:
        return tuple(BUILTIN_TEMPLATES[key.lower()])
    lines = []
    for number, raw in enumerate(spec.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if NAME not in line:
            raise InputError(f"Prompt template line {number} ({_shown(line)}) has no [name], so it would not train "
                             "the pseudo-word; use 'object', 'style', or lines that each hold [name].")
        lines.append(line)
    if not lines:
        raise InputError("The prompt template is empty: use 'object', 'style', or lines that each hold [name].")
    return tuple(lines)


def read_template_file(path: str | Path) -> str:
    """The text of a template file the command-line user names (a built-in name passes through unchanged)."""
    if str(path).strip().lower() in BUILTIN_TEMPLATES:
        return str(path).strip()
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"The prompt template {str(path)!r} is neither 'object', 'style' nor an existing text file.")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"The template file {path} could not be read as UTF-8 text ({e}).") from None


def _shown(line: str, limit: int = 60) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def fill(line: str, word: str, caption: str = "") -> str:
    """Put ``word`` for [name] and ``caption`` for [filewords], tidying the spaces and commas an empty
    caption leaves behind ("a photo of walle, [filewords]" -> "a photo of walle")."""
    text = line.replace(NAME, word).replace(FILEWORDS, caption)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")
