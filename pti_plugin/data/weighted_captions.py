"""kohya's ``weighted_captions``: A1111-style attention weights in captions (SD1.5 and SDXL).

``(word)`` multiplies the weight of ``word``'s tokens by 1.1, ``[word]`` divides it by 1.1, ``(word:1.5)`` multiplies
it by 1.5; brackets nest (their factors multiply); ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal
characters. An opening bracket never closed weighs everything after it; a closing bracket without its opening one is
plain text (kohya's ``parse_prompt_attention``). The weights apply to the final caption, after shuffling, tag dropout
and the pivot token's expansion (kohya parses when it tokenizes, after ``process_caption``).

Each parsed piece is tokenized on its own (without BOS/EOS), the ids are joined, truncated to ``max_token_length``
and framed as the plain tokenisation (BOS, ids, EOS, padding); BOS, EOS and padding weigh 1. The encoder's output
rows are multiplied by their tokens' weights, as kohya's ``train_network.py`` does today
(``strategy_sd.encode_tokens_with_weights``); kohya's older ``get_weighted_text_embeddings`` then rescaled the
conditioning to its mean before weighting, which the current code, and this one, do not. A family with several text
encoders (SDXL) tokenizes with each tokenizer and weighs each encoder's share of the rows by its own weights; its pooled
output is not weighted (kohya's ``strategy_sdxl``). The families call :func:`weighted_ids` and :func:`apply_weights`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from ..config import ConfigError

logger = logging.getLogger(__name__)

ROUND = 1.1  # "(word)"
SQUARE = 1 / 1.1  # "[word]"

# an escape, a lone backslash, an opening bracket, ":weight)", a closing bracket, a run of plain text, a lone colon
_PIECE = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (text, weight) pieces, adjacent pieces of equal weight merged (``[("", 1.0)]`` for ""). Raises
    ``ValueError`` for a weight that is no number (e.g. ``(word:1.2.3)``)."""
    pieces: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _PIECE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            (rounds if token == "(" else squares).append(len(pieces))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            pieces.append([token, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, w) for t, w in merged]


def bracket_problem(text: str) -> str | None:
    """Why ``text``'s brackets may not weigh what its author meant (unbalanced ones), or None."""
    depth = {"(": 0, "[": 0}
    stray = []
    for match in _PIECE.finditer(text):
        token = match.group(0)
        if token in ("(", "["):
            depth[token] += 1
        elif token == "]" or token == ")" or match.group(1) is not None:
            opener = "[" if token == "]" else "("
            if depth[opener]:
                depth[opener] -= 1
            else:
                stray.append(token)
    unclosed = "(" * depth["("] + "[" * depth["["]
    if stray:
        return f"closing {''.join(stray)!r} without its opening bracket (read as text)"
    return f"{unclosed!r} never closed (weighs the rest of the caption)" if unclosed else None


def weighted_ids(tokenizer, caption: str, length: int) -> tuple[list[int], list[float]]:
    """Token ids (``length`` of them: BOS, the weighted pieces' ids truncated, EOS, padding) and their weights."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_attention(caption):
        piece = tokenizer(text).input_ids[1:-1]
        ids += piece
        weights += [weight] * len(piece)
    ids, weights = ids[: length - 2], weights[: length - 2]
    fill = length - 2 - len(ids)
    return ([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * fill,
            [1.0] + weights + [1.0] * (fill + 1))


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``hidden`` [B, L, d] with each row multiplied by ``weights`` [B, L], as kohya's ``train_network.py`` weighs
    them (``strategy_sd.encode_tokens_with_weights``; its older ``get_weighted_text_embeddings`` also rescaled the
    result to the unweighted mean, which the current code does not)."""
    return hidden * weights.to(hidden.device, hidden.dtype).unsqueeze(-1)


def check_weighted_captions(enabled: bool, items: Iterable) -> bool:
    """Before training: with ``weighted_captions`` every caption's weights must parse (refused naming the key and the
    image); unbalanced brackets are warned about, naming the image. ``items``: the dataset's
    :class:`~pti_plugin.data.dataset.ImageItem` s. Returns ``enabled``."""
    if not enabled:
        return False
    from .captions import with_prefix_suffix

    captions = {(str(i.path), with_prefix_suffix(line, i.caption_options)) for i in items for line in (i.caption_lines or (i.caption,))}
    for where, caption in sorted(captions):
        try:
            parse_prompt_attention(caption)
        except ValueError as exc:
            raise ConfigError(f"key 'weighted_captions': the caption of {where} has a weight that is no number "
                              f"({exc}): {caption!r}") from exc
        problem = bracket_problem(caption)
        if problem:
            logger.warning("weighted_captions: the caption of %s has %s: %r (escape literal brackets as \\( \\))",
                           where, problem, caption)
    return True
