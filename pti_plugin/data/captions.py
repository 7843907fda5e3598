"""Captions and the pivot token: read a caption, make sure it names the token exactly once.

Captions are expected to contain the token string (as in kohya's textual inversion). A caption
without it gets it prepended (``"tok1, " + caption``) and the run warns once with the count; a
caption with it twice is an error naming the file. An image without a caption file takes its
subset's ``class_tokens`` (which must contain the token string), else the caption template.
With ``num_vectors_per_token = n`` the token string is expanded to the n pivot tokens.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)


class CaptionError(ValueError):
    """A caption that cannot be used (names the file)."""


def pivot_token_strings(token: str, num_vectors: int) -> list[str]:
    """The tokenizer tokens of the pivot: ``tok1`` then ``tok1_1`` ... (diffusers' multi-vector names)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def count_token(caption: str, token: str) -> int:
    """Occurrences of ``token`` as a whole word in ``caption``."""
    return len(re.findall(rf"(?<![\w]){re.escape(token)}(?![\w])", caption))


def expand_token(caption: str, token: str, num_vectors: int) -> str:
    """Replace the token string by the space-separated pivot tokens."""
    if num_vectors == 1:
        return caption
    return re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])", " ".join(pivot_token_strings(token, num_vectors)), caption)


def read_caption(image: Path, extension: str) -> str | None:
    """The caption file's text beside ``image`` (its first line, stripped), or None.

    None (the image then takes class_tokens or the template) when there is no caption file, when
    it is empty, or when it is not UTF-8 — the last two with a warning naming the file.
    """
    path = image.with_suffix(extension)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        logger.warning("caption %s is not UTF-8 (%s); using the default caption instead", path, exc.reason)
        return None
    if not text:
        logger.warning("caption %s is empty; using the default caption instead", path)
        return None
    return text.splitlines()[0].strip()


def warn_long_captions(token_counts: list[int], limit: int) -> None:
    """Warn once when captions exceed the text encoder's window (they are truncated)."""
    long = [n for n in token_counts if n > limit]
    if long:
        logger.warning(
            "%d caption(s) are longer than the text encoder's %d-token window (longest: %d tokens) and are truncated",
            len(long), limit, max(long),
        )


def resolve_caption(
    image: Path, caption: str | None, token: str, class_tokens: str | None, template: str
) -> tuple[str, bool]:
    """The caption with exactly one token string, and whether the token had to be prepended.

    ``caption`` is the caption file's text (None when there is none).
    """
    if caption is None:
        if class_tokens:
            if count_token(class_tokens, token) != 1:
                raise CaptionError(f"class_tokens {class_tokens!r} (for {image}) must contain the token {token!r} once")
            return class_tokens, False
        return template.format(token), False
    found = count_token(caption, token)
    if found > 1:
        raise CaptionError(f"caption of {image} names the token {token!r} {found} times; it must appear once")
    if found == 0:
        return f"{token}, {caption}" if caption else token, True
    return caption, False
