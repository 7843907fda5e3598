"""Captions and the pivot token: read captions, make sure they name the token once, and build the
final caption of each training sample (kohya's caption options).

Resolution at start-up (training images):
  Captions are expected to contain the token string (as in kohya's textual inversion). A caption
  without it gets it prepended (``"tok1, " + caption``) and the run warns once with the count; a
  caption with it twice is an error naming the file. The token may also come from
  ``caption_prefix``/``caption_suffix`` (it is counted over prefix + caption + suffix). An image
  without a caption file takes its subset's ``class_tokens`` (which must contain the token string),
  else the caption template. With ``enable_wildcard`` every line of a caption file is a candidate
  caption and each line is checked; the token may not sit inside a ``{a|b}`` choice (it could be
  chosen away).

Regularisation images (``is_reg``) are images of the class: their captions are used as written;
the token is neither required nor added (see :func:`resolve_reg_lines`).

Per sample (:func:`final_caption`), in kohya's order and with kohya's meanings: caption dropout
(``caption_dropout_rate``, ``caption_dropout_every_n_epochs``), one line of a multi-line caption
and ``{a|b}`` choices (``enable_wildcard``), prefix/suffix, the fixed parts (``keep_tokens`` or
``keep_tokens_separator``), the token warm-up's cut of the rest (``token_warmup_min``/``token_warmup_step``,
counted in the stage's steps), shuffling (``shuffle_caption``) and tag dropout
(``caption_tag_dropout_rate``) of the rest, then ``secondary_separator`` groups joined with
``caption_separator``. Every draw comes from the per-sample generator the caller passes, so the
result is a pure function of (seed, stage, step, slot).

The pivot token survives every transformation: the tag that holds it is never shuffled or
dropped (under ``shuffle_caption`` it keeps its index while the other tags are shuffled around it,
as a ``keep_tokens`` tag keeps its place; tag dropout removes only other tags); a dropped caption
(``caption_dropout_*``) becomes the token alone (kohya: the empty caption, which is what reg
images get). With ``num_vectors_per_token = n`` the token string is expanded to the n pivot tokens
last.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from .face_crop import face_name_parts

logger = logging.getLogger(__name__)


class CaptionError(ValueError):
    """A caption that cannot be used (names the file)."""


#: The preset's defaults (the keys are documented and defaulted once, in :class:`pti_plugin.config.Config`).
_PRESET = {f.name: f.default for f in fields(Config)}


@dataclass(frozen=True)
class CaptionOptions:
    """A subset's kohya caption options: the preset keys of the same names, with the preset's defaults
    (their checks: ``dataset_keys.CAPTION_KEYS``)."""

    shuffle_caption: bool = _PRESET["shuffle_caption"]
    keep_tokens: int = _PRESET["keep_tokens"]
    caption_separator: str = _PRESET["caption_separator"]
    keep_tokens_separator: str = _PRESET["keep_tokens_separator"]
    secondary_separator: str = _PRESET["secondary_separator"]
    enable_wildcard: bool = _PRESET["enable_wildcard"]
    caption_prefix: str = _PRESET["caption_prefix"]
    caption_suffix: str = _PRESET["caption_suffix"]
    caption_dropout_rate: float = _PRESET["caption_dropout_rate"]
    caption_dropout_every_n_epochs: int = _PRESET["caption_dropout_every_n_epochs"]
    caption_tag_dropout_rate: float = _PRESET["caption_tag_dropout_rate"]
    token_warmup_min: int = _PRESET["token_warmup_min"]
    token_warmup_step: float = _PRESET["token_warmup_step"]

    @property
    def moves_tags(self) -> bool:
        """Whether tags outside the fixed parts may be shuffled or dropped."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    def warmup_tags(self, flexible: int, step: int | None, stage_steps: int | None) -> int:
        """kohya's token warm-up: how many of the ``flexible`` movable tags (in caption order) a sample keeps at
        ``step`` (0-based, within the stage) of a stage of ``stage_steps`` steps: ``token_warmup_min`` at step 0,
        ``floor(step * (flexible - min) / W) + min`` before step W (``token_warmup_step``; a number below 1 is
        ``floor(W * stage_steps)``), all of them from step W on. ``step`` None (validation): all."""
        warmup = self.token_warmup_step
        if step is None or warmup <= 0:
            return flexible
        if warmup < 1:
            if stage_steps is None:
                raise ValueError("token_warmup_step below 1 is a fraction of the stage's steps, which are not known here")
            warmup = math.floor(warmup * stage_steps)
        if not warmup or step >= warmup:
            return flexible
        return math.floor(step * ((flexible - self.token_warmup_min) / warmup)) + self.token_warmup_min


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


def read_caption_lines(path: Path | None, all_lines: bool) -> list[str] | None:
    """The non-empty stripped lines of caption file ``path``, an image's :func:`caption_file` (only the first unless
    ``all_lines``), or None.

    None (the image then takes class_tokens or the template) when there is no caption file (``path`` None), when
    it is empty, or when it is not UTF-8 — the last two with a warning naming the file. A UTF-8
    byte-order mark is dropped; control characters (NUL, escape codes; not tabs or line breaks) are
    removed with a warning naming the file.
    """
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        logger.warning("caption %s is not UTF-8 (%s); using the default caption instead", path, exc.reason)
        return None
    controls = sorted({c for c in text if c not in "\t\n\r" and unicodedata.category(c) == "Cc"})
    if controls:
        logger.warning("caption %s holds control characters (%s); they were removed", path,
                       ", ".join(f"U+{ord(c):04X}" for c in controls))
        text = "".join(c if c not in controls else " " for c in text)
    text = text.strip()
    if not text:
        logger.warning("caption %s is empty; using the default caption instead", path)
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if all_lines else lines[:1]


def caption_file(image: Path, extension: str) -> Path | None:
    """The caption file of ``image`` (:func:`read_caption_lines` reads it), or None. ``extension`` may omit its dot
    (``"txt"``), as in kohya. Only regular files count (a named pipe never blocks the scan). As kohya, an image whose
    name ends in a face box (``<name>_<cx>_<cy>_<w>_<h>``: five or more ``_``-separated parts) without its own caption
    file takes ``<name>``'s. A name that differs only in letter case
    (``a.TXT``, ``a.Txt`` for ``a.png`` and ``.txt``) is taken when the exact one is missing, as Windows (where
    such files are often made) finds it; kohya on Linux does not."""
    extension = extension if extension.startswith(".") else "." + extension
    candidates = [image.with_suffix(extension)]
    if named := face_name_parts(image):
        candidates.append(image.with_name(named[0] + extension))
    if path := next((c for c in candidates if c.is_file()), None):
        return path
    try:
        names = _names_by_case(image.parent, image.parent.stat().st_mtime_ns)
    except OSError:
        return None
    return next((image.parent / names[c.name.casefold()] for c in candidates if c.name.casefold() in names
                 and (image.parent / names[c.name.casefold()]).is_file()), None)


@functools.lru_cache(maxsize=64)
def _names_by_case(folder: Path, mtime_ns: int) -> dict[str, str]:
    """The file names of ``folder`` by their case-folded form (the first in sorted order where two fold alike);
    ``mtime_ns`` keys the cache, so a folder changed since is listed again."""
    names: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        names.setdefault(name.casefold(), name)
    return names


def warn_long_captions(token_counts: list[int], limit: int) -> None:
    """Warn once when captions exceed the text encoder's window (they are truncated)."""
    long = [n for n in token_counts if n > limit]
    if long:
        logger.warning(
            "%d caption(s) are longer than the text encoder's %d-token window (longest: %d tokens) and are truncated",
            len(long), limit, max(long),
        )


# ----------------------------------------------------------------------------- wildcards

_WILDCARD = re.compile(r"\{([^}]+)\}")
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use stand-ins for the escaped "{{" and "}}"


def _escape_braces(text: str) -> str:
    return text.replace("{{", _OPEN).replace("}}", _CLOSE)


def _unescape_braces(text: str) -> str:
    return text.replace(_OPEN, "{").replace(_CLOSE, "}")


def expand_wildcards(text: str, generator: torch.Generator) -> str:
    """``{a|b|c}`` replaced by one of its choices (left to right, one draw each); ``{{``/``}}`` are literal braces."""

    def choose(match: re.Match) -> str:
        choices = match.group(1).split("|")
        return choices[_randint(generator, len(choices))]

    return _unescape_braces(_WILDCARD.sub(choose, _escape_braces(text)))


def _token_counts(text: str, token: str, wildcard: bool) -> tuple[int, int]:
    """(occurrences outside wildcard choices, occurrences inside them)."""
    if not wildcard:
        return count_token(text, token), 0
    escaped = _escape_braces(text)
    inside = sum(count_token(m.group(1), token) for m in _WILDCARD.finditer(escaped))
    return count_token(_WILDCARD.sub(" ", escaped), token), inside


# ----------------------------------------------------------------------------- start-up resolution

def with_prefix_suffix(line: str, options: CaptionOptions) -> str:
    """kohya: ``prefix + " " + caption`` and ``caption + " " + suffix`` (applied to every line here)."""
    if options.caption_prefix:
        line = f"{options.caption_prefix} {line}"
    if options.caption_suffix:
        line = f"{line} {options.caption_suffix}"
    return line.strip()


def names_token_once(class_tokens: str, token: str, options: CaptionOptions) -> bool:
    """Whether ``class_tokens`` with ``caption_prefix``/``caption_suffix`` names the token exactly once (a class caption
    a training image can take: :func:`resolve_lines`)."""
    return count_token(f"{options.caption_prefix} {class_tokens} {options.caption_suffix}", token) == 1


def resolve_lines(
    image: Path, lines: list[str] | None, token: str, class_tokens: str | None, template: str,
    options: CaptionOptions = CaptionOptions(),
) -> tuple[list[str], bool]:
    """A training image's caption lines, each naming the token exactly once (prefix and suffix
    counted), and whether the token had to be prepended to any of them.

    ``lines`` are the caption file's lines (None when there is none). Without them: ``class_tokens``
    (which must name the token, unless the prefix/suffix does), else an empty body when the
    prefix/suffix names the token, else the template.
    """
    in_affixes = count_token(f"{options.caption_prefix} {options.caption_suffix}", token)
    if lines is None:
        if class_tokens:
            if not names_token_once(class_tokens, token, options):
                where = " (caption_prefix/caption_suffix name it too)" if in_affixes else ""
                raise CaptionError(f"class_tokens {class_tokens!r} (for {image}) must contain the token {token!r} once{where}")
            return [class_tokens], False
        if in_affixes == 1:
            return [""], False
        return [template.format(token)], False
    resolved, prepended = [], False
    for line in lines:
        outside, inside = _token_counts(with_prefix_suffix(line, options), token, options.enable_wildcard)
        if inside:
            raise CaptionError(f"caption of {image} puts the token {token!r} inside a wildcard choice {{...|...}}, "
                               "where it could be chosen away; put it outside the braces")
        if outside > 1:
            where = " (caption_prefix/caption_suffix included)" if in_affixes else ""
            raise CaptionError(f"caption of {image} names the token {token!r} {outside} times{where}; it must appear once")
        if outside == 0:
            line = f"{token}, {line}" if line else token
            prepended = True
        resolved.append(line)
    return resolved, prepended


def resolve_caption(
    image: Path, caption: str | None, token: str, class_tokens: str | None, template: str
) -> tuple[str, bool]:
    """The caption with exactly one token string, and whether the token had to be prepended.

    ``caption`` is the caption file's text (None when there is none).
    """
    lines, prepended = resolve_lines(image, None if caption is None else [caption], token, class_tokens, template)
    return lines[0], prepended


def resolve_reg_lines(lines: list[str] | None, class_tokens: str | None, class_word: str, template: str) -> list[str]:
    """A regularisation image's caption lines: the caption file, else ``class_tokens`` (a
    ``reg_data_dir`` folder ``<repeats>_<class>`` gives its class), else the template with the
    class word (``init_word``) in the token's place. The token is neither required nor added."""
    if lines is not None:
        return lines
    if class_tokens:
        return [class_tokens]
    return [template.format(class_word)]


# ----------------------------------------------------------------------------- per-sample caption

def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, n: int) -> int:
    return int(torch.randint(0, n, (), generator=generator))


def _split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def split_fixed_and_flexible(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]] | None:
    """(fixed head, flexible tags, fixed tail) of ``caption``, or None when kohya leaves it as it is.

    ``keep_tokens_separator`` (when the caption holds it) splits head ||| flexible ||| tail;
    otherwise, when tags move, the first ``keep_tokens`` tags are the fixed head.
    """
    separator, kts = options.caption_separator, options.keep_tokens_separator
    if kts and kts in caption:
        head, rest = caption.split(kts, 1)
        flexible, tail = rest.split(kts, 1) if kts in rest else (rest, "")
        return _split_tags(head, separator), _split_tags(flexible, separator), _split_tags(tail, separator)
    if not options.moves_tags and not options.token_warmup_step > 0:
        return None
    tags = _split_tags(caption, separator)
    return tags[: options.keep_tokens], tags[options.keep_tokens :], []


def pinned_index(tags: list[str], token: str | None) -> int | None:
    """Index of the tag that names the pivot token, or None."""
    if token is None:
        return None
    return next((i for i, tag in enumerate(tags) if count_token(tag, token)), None)


def final_caption(item: Any, generator: torch.Generator, epoch: int, token: str, num_vectors: int,
                  step: int | None = None, stage_steps: int | None = None, templates: tuple[str, ...] = ()) -> str:
    """The caption fed to the text encoder for one draw of ``item`` (an :class:`ImageItem`).

    ``generator``: the sample's generator (seeded by seed, stage, step, slot); ``epoch``: 1-based
    epoch within the stage (``caption_dropout_every_n_epochs`` drops epochs n, 2n, ... as kohya).
    The draws are taken in a fixed order: dropout, line, wildcard choices, shuffle, tag dropout.
    The pivot token's tag keeps its index under shuffling and is never dropped (reg images: no pin).
    ``step``/``stage_steps``: the optimizer step (0-based, within the stage) and the stage's length, for the
    token warm-up (:meth:`CaptionOptions.warmup_tags`, applied before shuffling; it keeps the token's tag
    too); ``step`` None: no warm-up (the whole caption). ``templates`` (kohya's ``use_object_template`` /
    ``use_style_template``, ``caption_templates.py``): a training image's caption, unless dropped, is one of them
    drawn uniformly (right after the dropout draw) with the token in ``{}``; its own caption is not used.
    """
    options: CaptionOptions = item.caption_options
    is_reg = bool(getattr(item, "is_reg", False))
    lines = getattr(item, "caption_lines", None) or (item.caption,)
    u = _uniform(generator)
    dropped = (options.caption_dropout_rate > 0 and u < options.caption_dropout_rate) or (
        options.caption_dropout_every_n_epochs > 0 and epoch % options.caption_dropout_every_n_epochs == 0
    )
    if dropped:
        return "" if is_reg else expand_token(token, token, num_vectors)
    if templates and not is_reg:
        return expand_token(templates[_randint(generator, len(templates))].format(token), token, num_vectors)
    line = lines[_randint(generator, len(lines))] if options.enable_wildcard and len(lines) > 1 else lines[0]
    caption = with_prefix_suffix(line, options)
    if options.enable_wildcard:
        caption = expand_wildcards(caption, generator)
    parts = split_fixed_and_flexible(caption, options)
    if parts is not None:
        head, flexible, tail = parts
        kept = options.warmup_tags(len(flexible), step, stage_steps)
        if kept < len(flexible):  # token warm-up: the first ``kept`` movable tags, and the token's tag
            pin = pinned_index(flexible, None if is_reg else token)
            flexible = [tag for i, tag in enumerate(flexible) if i < kept or i == pin]
        if options.moves_tags:
            pin = pinned_index(flexible, None if is_reg else token)
            if options.shuffle_caption and flexible:
                others = [tag for i, tag in enumerate(flexible) if i != pin]
                others = [others[i] for i in torch.randperm(len(others), generator=generator).tolist()]
                if pin is not None:
                    others.insert(pin, flexible[pin])  # the token's tag keeps its index
                flexible = others
            if options.caption_tag_dropout_rate > 0 and flexible:
                keep = (torch.rand(len(flexible), generator=generator) >= options.caption_tag_dropout_rate).tolist()
                flexible = [tag for i, tag in enumerate(flexible) if keep[i] or i == pin]
        caption = ", ".join(head + flexible + tail)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return expand_token(caption, token, num_vectors)


def possible_captions(item: Any, token: str, num_vectors: int) -> list[str] | None:
    """Every caption :func:`final_caption` can give ``item``, or None when they vary from draw to draw
    (shuffled or dropped tags, several caption lines or ``{a|b}`` choices with wildcards on). With token
    warm-up: the caption at every warm-up length (a superset of what any stage's length draws)."""
    options: CaptionOptions = item.caption_options
    lines = getattr(item, "caption_lines", None) or (item.caption,)
    wildcards = options.enable_wildcard and (len(lines) > 1 or _WILDCARD.search(_escape_braces(lines[0])) is not None)
    if options.shuffle_caption or options.caption_tag_dropout_rate > 0 or wildcards:
        return None
    fixed = dataclasses.replace(options, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
    undropped = final_caption(dataclasses.replace(item, caption_options=fixed), torch.Generator(), 1, token, num_vectors)
    if options.token_warmup_step > 0:  # every warm-up length from token_warmup_min up (a superset of the stage's)
        tags = len(_split_tags(with_prefix_suffix(lines[0], options), options.caption_separator))
        warm = [final_caption(dataclasses.replace(item, caption_options=dataclasses.replace(
            fixed, token_warmup_min=k, token_warmup_step=1)), torch.Generator(), 1, token, num_vectors, step=0)
            for k in range(min(options.token_warmup_min, tags), tags)]
        undropped = list(dict.fromkeys(warm + [undropped]))
    else:
        undropped = [undropped]
    if options.caption_dropout_rate > 0 or options.caption_dropout_every_n_epochs > 0:
        return undropped + ["" if getattr(item, "is_reg", False) else expand_token(token, token, num_vectors)]
    return undropped


def tags_of(line: str) -> list[str]:
    """kohya's tag-frequency tags of one caption line: split on ``,``, stripped, lower-cased."""
    return [t.strip().lower() for t in line.split(",") if t.strip()]
