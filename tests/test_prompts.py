"""Prompt syntax as the webui reads it: attention weights, BREAK, chunks, pseudo-words found by their tokens."""
from __future__ import annotations

import pytest

from dreamartist.prompts import BREAK, CHUNK_LENGTH, WordFinder, chunk_prompt, parse_attention, words_used


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # the first "(" never closes: x1.1 to the end
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[unnecessary][parens]", [("unnecessaryparens", 1 / 1.1)]),
    ("a BREAK b", [("a", 1.0), (BREAK, -1), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


def letters(text: str) -> list[int]:
    """A toy tokenizer: one token per letter (a=1, ...), ',' = 99, whitespace dropped."""
    return [99 if c == "," else ord(c) - 96 for c in text.lower() if not c.isspace()]


IDS = dict(bos=100, eos=101, comma=99)


def test_words_are_found_by_their_tokens_longest_first_and_weighted():
    finder = WordFinder({"ab": 2, "abc": 3}, letters)
    assert words_used("x AB (abc:1.5) [abx]", letters, finder, **IDS) == [
        ("ab", 1.0), ("abc", 1.5), ("ab", pytest.approx(1 / 1.1))]
    (chunk,) = chunk_prompt("x abc", letters, finder, **IDS)
    assert chunk.tokens[:6] == [100, 24, 0, 0, 0, 101] and chunk.words == [(1, "abc")]
    assert len(chunk.tokens) == len(chunk.weights) == CHUNK_LENGTH + 2


def test_break_and_overflow_start_new_chunks():
    finder = WordFinder({"q": 5}, letters)
    chunks = chunk_prompt("a BREAK " + "b" * 73 + "q", letters, finder, **IDS)
    assert [c.tokens[1:3] for c in chunks] == [[1, 101], [2, 2], [0, 0]]
    assert chunks[2].words == [(0, "q")]
