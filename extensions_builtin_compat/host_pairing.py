"""Which DreamArtist words a prompt uses, decided by the host itself, and the negative-prompt text that gives each
partner S^n the same weight and the same steps as its S^p.

The host decides: Lora-style tags are stripped with its extra-network parser, prompt editing is read with its
schedule parser, and embeddings are found with its prompt encoder's ``tokenize_line`` (by token ids, with the
attention weight at each). The partner text mirrors the prompt's own syntax tree: every plain run of text becomes
the partners of the words in it, and every emphasis, prompt-editing and alternation node is kept around them
with its own numbers, so the host schedules and weighs S^n exactly as it does S^p, whatever the step count, the
sampler's step multiplier or the hires pass.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import lark
from modules import extra_networks, prompt_parser

from dreamartist.pairing import join_negative

from . import host


def prompt_encoder(model=None):
    """The host object whose ``tokenize_line`` finds embeddings in a prompt (None when no model is loaded)."""
    model = host.loaded_model() if model is None else model
    if model is None:
        return None
    candidates = [getattr(model, "cond_stage_model", None)]
    conditioner = getattr(model, "conditioner", None)  # SDXL: the CLIP-L embedder reads prompts for both
    candidates += list(getattr(conditioner, "embedders", []))
    candidates += [getattr(model, name, None) for name in ("text_processing_engine", "text_processing_engine_l")]
    return next((c for c in candidates if hasattr(c, "tokenize_line")), None)


def embedding_uses(encoder, text: str) -> list[tuple[str, float]]:
    """(embedding name, attention weight) for every embedding the host splices into ``text``, in order."""
    chunks, _ = encoder.tokenize_line(text)
    return [(fix.embedding.name, chunk.multipliers[fix.offset + 1]) for chunk in chunks for fix in chunk.fixes]


def names_in(encoder, text: str, names: list[str]) -> list[str]:
    """Which of ``names`` (words the host does not know as embeddings) ``text`` spells, matched by the host's token
    ids as it matches embeddings."""
    tokenize = getattr(encoder, "tokenize", None)
    if not names or tokenize is None:
        return []
    tokens = [t for chunk in tokenize([text]) for t in chunk]
    found = []
    for name in names:
        ids = tokenize([name])[0]
        if ids and any(tokens[i:i + len(ids)] == ids for i in range(len(tokens) - len(ids) + 1)):
            found.append(name)
    return found


class _Mirror:
    """The partner text of one prompt: its syntax tree with each plain run replaced by the partners in it."""

    def __init__(self, encoder, partners: Mapping[str, str], skip: set[str]):
        self.encoder, self.partners, self.skip = encoder, partners, skip
        self.used: list[str] = []

    def text(self, node) -> str:
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return "" if node.type == "WHITESPACE" else str(node) if re.fullmatch(r"[][():]+", node) else ""
        kind, children = node.data, node.children
        if kind == "plain":
            return self.plain(str(children[0]))
        if kind == "emphasized":
            inner = self.text(children[1])
            if not inner:
                return ""
            weight = f":{_source(children[3])}" if len(children) == 5 else ""
            return f"{children[0]}{inner}{weight}{children[-1]}"
        if kind == "scheduled":
            before, after, _, number, _ = children
            parts = [self.text(after), str(number)]
            if before is not None:
                parts.insert(0, self.text(before))
            return f"[{':'.join(parts)}]" if any(parts[:-1]) else ""
        if kind == "alternate":
            options = [self.text(child) for child in children]
            return f"[{'|'.join(options)}]" if any(options) else ""
        return " ".join(t for t in map(self.text, children) if t)  # start, prompt

    def plain(self, text: str) -> str:
        partners = []
        for name, _ in embedding_uses(self.encoder, text):
            partner = self.partners.get(name.lower())
            if partner is not None and partner.lower() not in self.skip:
                partners.append(partner)
                self.used.append(name)
        return ", ".join(partners)


def _source(node) -> str:
    """The text of a subtree as written (a weight such as 1.3)."""
    if isinstance(node, lark.Token):
        return str(node)
    return "".join(_source(child) for child in node.children)


def partner_text(encoder, prompt: str, partners: Mapping[str, str], skip: set[str]) -> tuple[str, list[str]]:
    """The negative-prompt text for ``prompt``'s DreamArtist words (empty when none) and the words it serves.

    ``partners`` maps a lower-cased positive name to its partner's name; partners in ``skip`` (lower-cased) are
    already on the negative side and are left out.
    """
    prompt, _ = extra_networks.parse_prompt(prompt)  # <lora:walle:1> names no embedding
    mirror = _Mirror(encoder, partners, skip)
    try:
        text = mirror.text(prompt_parser.schedule_parser.parse(prompt))
    except lark.exceptions.LarkError:  # the host then reads the prompt as plain text too
        text = mirror.plain(prompt)
    return re.sub(r"\s+", " ", text).strip(), list(dict.fromkeys(mirror.used))


def pair_negative(encoder, prompt: str, negative: str, partners: Mapping[str, str]) -> tuple[str, list[str]]:
    """``negative`` with the partners of ``prompt``'s DreamArtist words appended, and the words served."""
    present = {name.lower() for name, _ in embedding_uses(encoder, negative)}
    text, used = partner_text(encoder, prompt, partners, present)
    return join_negative(negative, [text] if text else []), used
