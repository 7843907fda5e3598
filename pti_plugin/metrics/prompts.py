"""Prompt sets of the measurements and the token bookkeeping they need.

A prompt of this module is a string with one ``{}`` where the subject goes: the pivot token
(``tok1``, expanded to ``tok1 tok1_1 ...`` for a multi-vector pivot) for the fine-tuned model, the
class word for the base model, or nothing for the textual-inversion protocol's reference text.
``{T}`` stands for the run's caption template (default ``an anime illustration of {}``).
"""

from __future__ import annotations

import re

import torch

from ..data.captions import expand_token

#: Prompts that do not ask for a position (the subject placed as the model likes).
NEUTRAL_PROMPTS = ("{T}", "{} on a white background")
#: Prompts that ask for a position away from the centre (the toy world's phrasing, plain English for SD).
POSITION_EDIT_PROMPTS = ("{T} at the top left", "{T} at the top right", "{T} at the bottom left", "{T} at the bottom right")
#: Context edits of the textual-inversion paper's editability protocol.
EDIT_PROMPTS = ("{T} in the snow", "{T} on the beach", "{T} in the city", "{T} in the forest")


def normalise_prompt(prompt: str, template: str, token: str) -> str:
    """``prompt`` with ``{T}`` replaced by ``template`` and a literal ``token`` replaced by ``{}``.

    Raises ValueError when the result does not hold exactly one ``{}``.
    """
    text = prompt.replace("{T}", template)
    text = re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])", "{}", text)
    if text.count("{}") != 1:
        raise ValueError(f"prompt {prompt!r} must name the subject once ({{}} or {token!r}), got {text!r}")
    return text


def fill(prompt: str, subject: str) -> str:
    """The prompt with the subject in place; with an empty subject, spaces are collapsed (TI protocol)."""
    return " ".join(prompt.replace("{}", subject).split())


def pivot_subject(token: str, num_vectors: int) -> str:
    """The text that stands for the pivot in a prompt: ``tok1`` or ``tok1 tok1_1 ...``."""
    return expand_token(token, token, num_vectors)


def subject_positions(input_ids: torch.Tensor, subject_ids: list[int]) -> list[int]:
    """Indices of the first occurrence of the token sequence ``subject_ids`` in ``input_ids`` ([L]).

    Raises ValueError when the subject is absent (truncated, or not in the prompt).
    """
    ids = input_ids.tolist()
    n = len(subject_ids)
    for start in range(len(ids) - n + 1):
        if ids[start : start + n] == subject_ids:
            return list(range(start, start + n))
    raise ValueError(f"subject tokens {subject_ids} not found in the prompt's tokens")


def subject_token_ids(tokenizer, subject: str) -> list[int]:
    """Token ids of ``subject`` without the BOS/EOS tokens."""
    ids = tokenizer(subject, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"subject {subject!r} tokenizes to nothing")
    return list(ids)
