"""Prompts as the webui reads them: attention weights, 75-token chunks, pseudo-words matched by their tokens.

The standalone backend encodes prompts through this module so that a prompt means the same thing on the command
line as in the webui (1.6-1.10):
- ``(text)`` multiplies the weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` sets a factor, ``\\(``
  is a literal bracket, and ``BREAK`` starts a new chunk;
- a prompt is cut into chunks of 75 tokens, each encoded as BOS + 75 tokens + EOS (padded with EOS); when a chunk
  fills up, the tokens after its last comma (if within the last 20) move to the next chunk, and a pseudo-word
  that does not fit whole starts a new chunk;
- a pseudo-word is found where its own token ids appear in the prompt's token ids (so matching follows the
  tokenizer: case-insensitive, whole BPE words), longest name first, and occupies one slot per vector.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, weight) runs; a BREAK is the piece "BREAK" with weight -1."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append([BREAK, -1])
                runs.append([part, 1.0])
    for start in round_open:  # unclosed brackets reach to the end
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(piece, weight) for piece, weight in merged]


@dataclass
class Chunk:
    """75 token ids between BOS and EOS, their weights, and where each pseudo-word's vectors go."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    words: list[tuple[int, str]] = field(default_factory=list)  # (offset after BOS, pseudo-word)


class WordFinder:
    """Finds pseudo-words in token ids by their own token ids, longest first (the webui's embedding lookup)."""

    def __init__(self, words: Mapping[str, int], tokenize: Callable[[str], list[int]]):
        self.lengths = dict(words)  # pseudo-word -> vectors
        self.by_first: dict[int, list[tuple[list[int], str]]] = {}
        for word in words:
            ids = tokenize(word)
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, word))
        for entries in self.by_first.values():
            entries.sort(key=lambda entry: len(entry[0]), reverse=True)

    def at(self, tokens: list[int], position: int) -> tuple[str, int] | None:
        """(pseudo-word, tokens its name takes) when one starts at ``position``."""
        for ids, word in self.by_first.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return word, len(ids)
        return None


def chunk_prompt(text: str, tokenize: Callable[[str], list[int]], finder: WordFinder, *, bos: int, eos: int,
                 comma: int, emphasis: bool = True) -> list[Chunk]:
    """The chunks of one prompt, each BOS + 75 tokens + EOS, with pseudo-word slots (token id 0) filled later."""
    runs = parse_attention(text) if emphasis else [(text, 1.0)]
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [bos] + chunk.tokens + [eos] * pad + [eos]
        chunk.weights = [1.0] + chunk.weights + [1.0] * pad + [1.0]
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece, weight in runs:
        if piece == BREAK and weight == -1:
            close()
            continue
        tokens = tokenize(piece)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1  # the words after the last comma move on with the next chunk
                moved = chunk.tokens[cut:], chunk.weights[cut:], [(o - cut, w) for o, w in chunk.words if o >= cut]
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.words = [(o, w) for o, w in chunk.words if o < cut]
                close()
                chunk.tokens, chunk.weights, chunk.words = list(moved[0]), list(moved[1]), moved[2]
            if len(chunk.tokens) == CHUNK_LENGTH:
                close()
            found = finder.at(tokens, position)
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            word, name_tokens = found
            vectors = finder.lengths[word]
            if len(chunk.tokens) + vectors > CHUNK_LENGTH:
                close()
            chunk.words.append((len(chunk.tokens), word))
            chunk.tokens += [0] * vectors
            chunk.weights += [weight] * vectors
            position += name_tokens
    if chunk.tokens or not chunks:
        close()
    return chunks


def empty_chunk(bos: int, eos: int) -> Chunk:
    """What pads a prompt to the chunk count of the longest prompt in its batch."""
    return Chunk(tokens=[bos] + [eos] * (CHUNK_LENGTH + 1), weights=[1.0] * (CHUNK_LENGTH + 2))


def words_used(text: str, tokenize: Callable[[str], list[int]], finder: WordFinder,
               **ids: int) -> list[tuple[str, float]]:
    """Every pseudo-word occurrence in ``text`` with its attention weight, in prompt order."""
    return [(word, chunk.weights[offset + 1]) for chunk in chunk_prompt(text, tokenize, finder, **ids)
            for offset, word in chunk.words]
