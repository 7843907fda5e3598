"""A small CLIP tokenizer vocabulary in which every listed word is exactly one token.

The real CLIP BPE vocabulary is not shipped. Tests, the embedded default model and the toy world
use this one instead: it keeps CLIP's byte-level alphabet (so any text tokenizes, letter by letter
where no merge applies) and adds merge chains that turn each listed word into a single
``word</w>`` token. With it ``an anime illustration of tok1`` places ``tok1`` at index 5, as the
real SD1.5 tokenizer does.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

#: Words every generated vocabulary contains: the prompt template and the default class/init words.
BASE_WORDS = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "anime", "illustration", "photo",
    "picture", "character", "person", "girl", "boy", "solo", "standing", "sitting", "snow",
    "beach", "city", "forest", "red", "green", "blue", "yellow", "white", "black", "hair",
)


def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode alphabet (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab(words: list[str] | tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges such that each of ``words`` (lower-case letters) is one token.

    Merges are appended until every word encodes to a single symbol; an appended merge never
    changes the encoding of a word that is already a single symbol, so this terminates.
    """
    words = sorted({w.lower() for w in words})
    for w in words:
        if not w.isalpha() or not w.isascii():
            raise ValueError(f"vocabulary words must be ASCII letters only, got {w!r}")
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for w in words:
            pieces = _apply_bpe(_symbols(w), ranks)
            if len(pieces) == 1:
                continue
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            changed = True
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def filler_words(rows: int) -> list[str]:
    """Letter-only words (the first four-letter ones: ``aaaa``, ``aaab``, ...) with which :func:`write_tokenizer_files`
    writes a vocabulary of exactly ``rows`` tokens, e.g. CLIP's 49408 (the benchmarks' SD1.5- and SDXL-sized token
    tables). Each filler adds its own token, and the first of its 2- and 3-letter prefixes that prefix's, beside the
    vocabulary's other tokens (the byte symbols, the base words' merges, BOS, EOS): the count is found by building the
    vocabulary (a few builds, seconds each). A ValueError where no count gives ``rows``."""
    import itertools
    import string

    words = ["".join(w) for w in itertools.islice(itertools.product(string.ascii_lowercase, repeat=4), rows)]
    count, tried = rows, set()
    while count not in tried and 0 <= count <= len(words):
        tried.add(count)
        size = len(build_vocab(BASE_WORDS + tuple(words[:count]))[0])
        if size == rows:
            return words[:count]
        count -= size - rows  # each filler adds at least one token (none where it is a base word)
    raise ValueError(f"no number of filler words gives a vocabulary of {rows} tokens")


def write_tokenizer_files(words: list[str] | tuple[str, ...], out_dir: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``out_dir``.

    The folder then loads with ``CLIPTokenizer.from_pretrained(out_dir)`` (offline).
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(tuple(BASE_WORDS) + tuple(words))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
            }
        )
    )
    return out
