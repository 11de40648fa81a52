"""Prompt tokenization with learned pseudo-words replaced by placeholder slots, as the webui splices embeddings."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PLACEHOLDER_ID = 0  # the id the webui puts where an embedding's vectors go; the rows are overwritten anyway


@dataclass(frozen=True)
class Splice:
    """Where one occurrence of a pseudo-word lands in a tokenized prompt."""

    word: str
    start: int  # first token row, BOS included in the count
    count: int  # rows that fit before EOS (a word cut by truncation keeps its first vectors)


def word_pattern(words: Iterable[str]) -> re.Pattern | None:
    """Whole-word, case-insensitive matcher that tries longer names first ('walle-neg' before 'walle')."""
    names = sorted(set(words), key=lambda name: (-len(name), name))
    if not names:
        return None
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"(?<![\w])({alternatives})(?![\w])", re.IGNORECASE)


def tokenize_with_slots(
    prompt: str,
    tokenize: Callable[[str], list[int]],
    word_lengths: dict[str, int],
    *,
    bos: int,
    eos: int,
    pad: int,
    length: int = 77,
) -> tuple[list[int], list[Splice]]:
    """Token ids of ``prompt`` padded or cut to ``length``, and the rows each known word's vectors replace.

    ``tokenize`` returns ids without BOS/EOS; ``word_lengths`` maps each pseudo-word to its vector count.
    """
    by_lower = {name.lower(): name for name in word_lengths}
    pattern = word_pattern(word_lengths)
    body: list[int] = []
    found: list[tuple[str, int]] = []  # (word, offset in body)
    position = 0
    for match in pattern.finditer(prompt) if pattern else ():
        body += tokenize(prompt[position : match.start()])
        word = by_lower[match.group(1).lower()]
        found.append((word, len(body)))
        body += [PLACEHOLDER_ID] * word_lengths[word]
        position = match.end()
    body += tokenize(prompt[position:])

    room = length - 2
    ids = [bos] + body[:room] + [eos]
    ids += [pad] * (length - len(ids))
    splices = [Splice(word, offset + 1, min(word_lengths[word], room - offset))
               for word, offset in found if offset < room]
    return ids, splices
