"""Automatic pairing: every use of a DreamArtist word S^p in a prompt brings its partner S^n to the negative side,
with the same attention weight (paper sec. 4.1: S^p in the prompt, S^n in the negative prompt; several concepts
compose by putting all of them on their sides, sec. 6.7).

Which words a prompt uses is decided as the webui decides which embeddings a prompt uses: by their token ids
(``dreamartist.prompts``), after attention syntax. The webui extension decides it with the host's own parser
instead (extensions_builtin_compat.prompt_hook); both write the partner with ``partner_text``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from .prompts import WordFinder, words_used


def partner_text(partner: str, weight: float) -> str:
    """``walle-neg``, or ``(walle-neg:1.21)`` when its S^p carries another attention weight."""
    return partner if abs(weight - 1.0) < 1e-6 else f"({partner}:{weight:.4g})"


def join_negative(negative_prompt: str, extra: list[str]) -> str:
    """``negative_prompt`` with ``extra`` appended, comma-separated."""
    if not extra:
        return negative_prompt
    joined = ", ".join(extra)
    return f"{negative_prompt.rstrip().rstrip(',')}, {joined}" if negative_prompt.strip() else joined


def add_partners(prompt: str, negative_prompt: str, partners: Mapping[str, str],
                 tokenize: Callable[[str], list[int]], **special_ids: int) -> tuple[str, list[str]]:
    """Append to ``negative_prompt`` the partner of each use of a positive word in ``prompt``, unless the negative
    prompt already uses that partner. ``partners`` maps NAME -> NAME-neg; ``special_ids`` are the tokenizer's
    bos, eos and comma ids. Returns the new negative prompt and the positive names whose partners were added."""
    finder = WordFinder({word: 1 for pair in partners.items() for word in pair}, tokenize)
    present = {word.lower() for word, _ in words_used(negative_prompt, tokenize, finder, **special_ids)}
    extra, added = [], []
    for word, weight in words_used(prompt, tokenize, finder, **special_ids):
        partner = partners.get(word)
        if partner is not None and partner.lower() not in present:
            extra.append(partner_text(partner, weight))
            added.append(word)
    return join_negative(negative_prompt, extra), list(dict.fromkeys(added))
