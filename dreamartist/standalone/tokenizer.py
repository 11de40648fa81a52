"""The CLIP tokenizer, built offline from the BPE vocabulary that open_clip_torch ships."""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from dreamartist.errors import ModelError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # OpenAI CLIP keeps the first 48894 merges of the file
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def bpe_path() -> Path:
    """Locate open_clip's BPE file without importing open_clip (its import is slow and pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise ModelError("The CLIP vocabulary was not found; install open_clip_torch.")


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, str]:
    """vocab.json and merges.txt contents, derived exactly as OpenAI's CLIP tokenizer derives its vocabulary."""
    lines = gzip.decompress(bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n"
    return json.dumps(vocab, ensure_ascii=False), merges_text


def clip_tokenizer(model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with the 49408-token OpenAI CLIP vocabulary, built without the network."""
    from transformers import CLIPTokenizer

    vocab_json, merges_text = vocabulary()
    with tempfile.TemporaryDirectory(prefix="dreamartist-clip-") as folder:
        (Path(folder) / "vocab.json").write_text(vocab_json, encoding="utf-8")
        (Path(folder) / "merges.txt").write_text(merges_text, encoding="utf-8")
        # Every transformers version reads both files completely while constructing the tokenizer.
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, local_files_only=True)
