"""Automatic pairing: every DreamArtist word in a prompt brings its partner to the negative prompt.

The paper samples with S^p in the prompt and S^n in the negative prompt (sec. 4.1), and several concepts
compose by putting all their S^p and S^n on their sides (sec. 6.7). Words are matched the way the webui
matches embedding names: whole words, with attention syntax such as (walle:1.2) or [walle] around them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping


def _word_pattern(word: str) -> re.Pattern:
    # A name is a word when no other name character touches it; names may contain '-', '.', ' '.
    return re.compile(rf"(?<![\w\-.]){re.escape(word)}(?![\w\-])", re.IGNORECASE)


def _weight_of(prompt: str, match: re.Match) -> str:
    """The attention weight written right after the word, '(walle:1.2)' -> '1.2'; '' when none."""
    after = re.match(r"\s*:\s*([0-9]*\.?[0-9]+)\s*\)", prompt[match.end():])
    return after.group(1) if after else ""


def words_in(prompt: str, partners: Mapping[str, str]) -> list[str]:
    """The positive names of ``partners`` that occur in ``prompt``, in order of appearance."""
    found = []
    for word in partners:
        match = _word_pattern(word).search(prompt)
        if match:
            found.append((match.start(), word))
    return [word for _, word in sorted(found)]


def add_partners(prompt: str, negative_prompt: str, partners: Mapping[str, str]) -> tuple[str, list[str]]:
    """Append to ``negative_prompt`` the partner of each positive word in ``prompt`` not already there.

    ``partners`` maps a positive name to its negative name (walle -> walle-neg). A weight given to the
    positive word, (walle:1.2), is carried over to its partner, (walle-neg:1.2). Returns the new negative
    prompt and the positive names whose partners were added.
    """
    added, extra = [], []
    for word in words_in(prompt, partners):
        partner = partners[word]
        if any(_word_pattern(partner).search(text) for text in (negative_prompt, *extra)):
            continue  # already on the negative side (names differing only in case count as one)
        match = _word_pattern(word).search(prompt)
        weight = _weight_of(prompt, match)
        extra.append(f"({partner}:{weight})" if weight else partner)
        added.append(word)
    if not extra:
        return negative_prompt, []
    joined = ", ".join(extra)
    negative = f"{negative_prompt.rstrip().rstrip(',')}, {joined}" if negative_prompt.strip() else joined
    return negative, added
