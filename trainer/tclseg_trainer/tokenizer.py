"""CLIP's byte-level BPE tokenizer.

Text is cleaned (ftfy, HTML entities unescaped twice, runs of whitespace collapsed), lower-cased, split with
CLIP's regular expression, mapped byte by byte onto printable unicode characters and merged with the 48,894
BPE merges of `bpe_simple_vocab_16e6.txt.gz`. The Rust runtime reimplements exactly this, so keep it plain.
"""

from __future__ import annotations

import gzip
import html
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

SOT_TOKEN = 49406  # <|startoftext|>
EOT_TOKEN = 49407  # <|endoftext|>
CONTEXT_LENGTH = 77
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV = "TCLSEG_BPE_VOCAB"

# The vocabulary file's first line is a version header; the next 49152 - 256 - 2 lines are merges, so that
# 256 bytes + 256 end-of-word bytes + merges + 2 special tokens = 49408 ids.
NUM_MERGES = 49152 - 256 - 2

# Contractions, runs of letters, single digits, runs of other non-space symbols. Special tokens first so a
# literal "<|endoftext|>" in the text stays one token. Matched case-insensitively, like CLIP.
_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_vocab_path() -> Path:
    """TCLSEG_BPE_VOCAB if set, else <repo>/.deps/clip/bpe_simple_vocab_16e6.txt.gz."""
    env = os.environ.get(VOCAB_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo / ".deps" / "clip" / VOCAB_FILENAME


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (control characters, space, ...) are moved to
    code points 256 and up, in byte order, so BPE never sees whitespace or control characters.
    The dict's order matters: it is the order of the first 256 vocabulary ids (printable bytes first).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    moved = [b for b in range(256) if b not in mapping]
    for i, b in enumerate(moved):
        mapping[b] = chr(256 + i)
    return mapping


def clean_text(text: str) -> str:
    """ftfy repair, HTML unescape (twice: captions are often double-escaped), whitespace collapse, lower."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = regex.sub(r"\s+", " ", text).strip()
    return text.lower()


class Tokenizer:
    def __init__(self, vocab_path: str | os.PathLike | None = None):
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP BPE vocabulary not found at {path}; run scripts/setup to fetch it "
                f"(or point {VOCAB_ENV} at {VOCAB_FILENAME})"
            )
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]

        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot = self.encoder["<|startoftext|>"]
        self.eot = self.encoder["<|endoftext|>"]
        self.path = path
        self._cache: dict[str, list[str]] = {
            "<|startoftext|>": ["<|startoftext|>"],
            "<|endoftext|>": ["<|endoftext|>"],
        }

    def bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token; the last symbol carries the end-of-word marker."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            # The lowest-ranked adjacent pair is merged everywhere it occurs, left to right.
            pairs = set(zip(symbols, symbols[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without the start/end tokens."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(chars))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(
        self, texts: str | list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True
    ) -> torch.Tensor:
        """[T, context_length] int64: SOT, ids, EOT, zero padding. Over-long texts are cut, EOT kept last."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"text is {len(ids)} tokens, over the context of {context_length}: {text!r}")
                ids = ids[:context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    __call__ = tokenize


@lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | None = None) -> Tokenizer:
    return Tokenizer(vocab_path)


def tokenize(
    texts: str | list[str],
    context_length: int = CONTEXT_LENGTH,
    truncate: bool = True,
    vocab_path: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Tokenize with a cached tokenizer for `vocab_path` (default: see `default_vocab_path`)."""
    path = str(vocab_path) if vocab_path is not None else str(default_vocab_path())
    return get_tokenizer(path).tokenize(texts, context_length, truncate)
