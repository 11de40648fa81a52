"""modules.prompt_parser: emphasis parsing, "(word)" x1.1, "[word]" /1.1, "(word:1.2)", "\\(" escapes."""
from __future__ import annotations

import re
from collections import namedtuple

import lark
import torch

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


class SdConditioning(list):
    """A list of prompts for the conditioner, marked as negative ones or not (the text encoder's hooks see it)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """Per prompt, its schedule with each text encoded; each distinct prompt's texts in one encoder call."""
    res, cache = [], {}
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    for prompt, schedule in zip(prompts, schedules, strict=True):
        if prompt not in cache:
            conds = model.get_learned_conditioning(SdConditioning([text for _, text in schedule], copy_from=prompts))
            cache[prompt] = [ScheduledPromptConditioning(end, {k: v[i] for k, v in conds.items()}
                                                         if isinstance(conds, dict) else conds[i])
                             for i, (end, _) in enumerate(schedule)]
        res.append(cache[prompt])
    return res


def get_multicond_prompt_list(prompts):
    """Per prompt, (index, weight) of each AND sub-prompt in one de-duplicated flat list of sub-prompts."""
    res_indexes, flat, indexes = [], SdConditioning([], copy_from=prompts), {}
    for prompt in prompts:
        found = []
        for subprompt in re_AND.split(prompt):
            text, weight = re_weight.search(subprompt).groups()
            if text not in indexes:
                indexes[text] = len(flat)
                flat.append(text)
            found.append((indexes[text], float(weight) if weight is not None else 1.0))
        res_indexes.append(found)
    return res_indexes, flat, indexes


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


class DictWithShape(dict):
    """SDXL's conds: {"crossattn": (rows, 77k, 2048), "vector": (rows, 2816)}, with the crossattn's shape."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _at_step(schedule, step):
    return next((entry.cond for entry in schedule if step <= entry.end_at_step), schedule[-1].cond)


def _stacked(tensors: list):
    """torch.stack, per key for SDXL's dict conds (a DictWithShape)."""
    if isinstance(tensors[0], dict):
        stacked = {k: torch.stack([t[k] for t in tensors]) for k in tensors[0]}
        return DictWithShape(stacked, stacked["crossattn"].shape)
    return torch.stack(tensors)


def reconstruct_cond_batch(c, current_step):
    return _stacked([_at_step(schedule, current_step) for schedule in c])


def reconstruct_multicond_batch(c, current_step):
    """(conds_list, tensor): per image, (row, weight) of each AND sub-prompt; the rows image-major."""
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable in composable_prompts:
            conds_for_batch.append((len(tensors), composable.weight))
            tensors.append(_at_step(composable.schedules, current_step))
        conds_list.append(conds_for_batch)
    def padded(ts: list) -> list:  # prompts of other lengths: the last vector repeated, as 1.6+ does
        width = max(t.shape[0] for t in ts)
        return [torch.cat([t, t[-1:].expand(width - t.shape[0], -1)]) if t.shape[0] < width else t for t in ts]

    if isinstance(tensors[0], dict):
        return conds_list, _stacked([dict(zip(tensors[0], values))
                                     for values in zip(*(padded([t[k] for t in tensors]) for k in tensors[0]))])
    return conds_list, torch.stack(padded(tensors))
