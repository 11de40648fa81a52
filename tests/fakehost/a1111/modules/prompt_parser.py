"""modules.prompt_parser: emphasis parsing, "(word)" x1.1, "[word]" /1.1, "(word:1.2)", "\\(" escapes."""
from __future__ import annotations

import re

_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|[\\:]")
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[list]:
    """[[text, weight], ...] with equal neighbours merged; [["", 1.0]] for an empty prompt."""
    parts: list[list] = []
    open_brackets: list[tuple[int, str]] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            parts.append([token[1], 1.0])
        elif token in ("(", "["):
            open_brackets.append((len(parts), token))
        elif weight is not None and open_brackets and open_brackets[-1][1] == "(":
            scale(open_brackets.pop()[0], float(weight))
        elif token == ")" and open_brackets and open_brackets[-1][1] == "(":
            scale(open_brackets.pop()[0], ROUND)
        elif token == "]" and open_brackets and open_brackets[-1][1] == "[":
            scale(open_brackets.pop()[0], SQUARE)
        else:
            parts.append([token, 1.0])
    for start, bracket in reversed(open_brackets):  # unclosed brackets apply to the rest of the prompt
        scale(start, ROUND if bracket == "(" else SQUARE)

    merged: list[list] = []
    for part in parts:
        if merged and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return merged or [["", 1.0]]
