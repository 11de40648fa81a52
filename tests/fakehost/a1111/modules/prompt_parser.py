"""modules.prompt_parser: emphasis parsing, "(word)" x1.1, "[word]" /1.1, "(word:1.2)", "\\(" escapes."""
from __future__ import annotations

import re

import lark

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


# Prompt editing, as the webui schedules it: [from:to:when], [to:when], [from::when] and [a|b] alternation, with
# "when" a step number, or a fraction of the steps when it has a decimal point (hires: counted past the first pass).
schedule_parser = lark.Lark(r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
""")


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    """For each prompt, [[end_at_step, text], ...]: the text in force up to and including each step."""
    if hires_steps is None or use_old_scheduling:
        int_offset, float_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, float_offset, steps = base_steps, 1.0, hires_steps

    def when(number: str) -> int:
        value = float(number)
        if use_old_scheduling:
            value = value * steps if value < 1 else value
        else:
            value = (value - float_offset) * steps if "." in number else value - int_offset
        return min(steps, int(value))

    def boundaries(tree) -> list[int]:
        found = {steps}
        for node in tree.iter_subtrees():
            if node.data == "scheduled" and when(node.children[-2]) >= 1:
                found.add(when(node.children[-2]))
            elif node.data == "alternate":
                found.update(range(1, steps + 1))
        return sorted(found)

    def text_at(node, step: int) -> str:
        if isinstance(node, lark.Token):
            return str(node)
        if node is None:
            return ""
        if node.data == "scheduled":
            before, after, _, number, _ = node.children
            return text_at(before, step) if step <= when(number) else text_at(after, step)
        if node.data == "alternate":
            options = node.children
            return text_at(options[(step - 1) % len(options)], step)
        return "".join(text_at(child, step) for child in node.children)

    def schedule(prompt: str) -> list:
        try:
            tree = schedule_parser.parse(prompt)
        except lark.exceptions.LarkError:
            return [[steps, prompt]]
        return [[step, text_at(tree, step)] for step in boundaries(tree)]

    return [schedule(prompt) for prompt in prompts]
