"""Sentence sets of the ellipsoid check: the built-in set, ``T(word)`` prompts and sentence files."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..text_files import path_not_found

DEFAULT_TEMPLATE = "an anime illustration of {}"
#: Size of the built-in template x words sentence set.
DEFAULT_BUILTIN_SIZE = 600


#: Word pools of the built-in set. Words that are not one token for the tokenizer in use are
#: dropped (the toy vocabulary keeps a few of each pool; CLIP's BPE keeps nearly all).
WORD_POOLS: dict[str, tuple[str, ...]] = {
    "medium": ("photo", "picture", "illustration", "painting", "drawing", "sketch", "portrait", "poster",
               "render", "image", "photograph", "watercolor"),
    "subject": ("character", "person", "girl", "boy", "man", "woman", "child", "cat", "dog", "bird", "horse",
                "knight", "robot", "dragon", "car", "house", "tree", "flower", "ship", "castle", "soldier",
                "witch", "king", "queen", "student", "teacher", "doctor", "farmer", "circle", "square",
                "triangle", "shape", "object", "wolf", "fox", "rabbit", "owl", "bear", "lion", "tiger",
                "elephant", "train", "boat", "chair", "table", "lamp", "book", "guitar", "apple", "cake"),
    "people": ("character", "person", "girl", "boy", "man", "woman", "child", "knight", "witch", "king",
               "queen", "student", "teacher", "doctor", "farmer", "soldier", "princess", "warrior"),
    "colour": ("red", "green", "blue", "yellow", "white", "black", "purple", "orange", "gray", "pink",
               "brown", "golden", "silver"),
    "place": ("snow", "beach", "city", "forest", "rain", "park", "room", "street", "garden", "desert",
              "river", "mountains", "sky", "field", "kitchen", "library", "ocean", "jungle", "village",
              "station", "classroom", "market"),
    "pose": ("standing", "sitting", "running", "walking", "smiling", "sleeping", "reading", "dancing",
             "jumping", "flying", "swimming", "waiting"),
    "adjective": ("old", "young", "small", "large", "happy", "sad", "tall", "tiny", "beautiful", "angry",
                  "cute", "strange", "quiet", "famous"),
    "time": ("night", "dawn", "sunset", "noon", "midnight", "dusk"),
    "row": ("top", "middle", "bottom"),
    "col": ("left", "center", "right"),
}

#: Built-in templates: ``{pool}`` slots (``{pool2}`` draws a second word of the same pool). No
#: template fixes every token up to index 5: sentences sharing their tokens up to an index share
#: their state there (causal attention), and a fixed prefix would pile identical states at index 5.
BUILTIN_TEMPLATES: tuple[str, ...] = (
    "a {medium} of a {subject}",
    "a {medium} of a {colour} {subject}",
    "a {medium} of a {subject} {pose} in the {place}",
    "an anime illustration of {subject} {pose} in the {place}",
    "an anime illustration of {colour} {subject} {pose} in the {place}",
    "an anime illustration of {people} with {colour} hair",
    "an anime illustration of {adjective} {subject} at {time}",
    "a {subject} {pose} in the {place}",
    "a {colour} {subject} on the {place}",
    "a {people} with {colour} hair",
    "a {people} with {colour} hair {pose} on the {place}",
    "a {people} with {colour} hair and a {colour2} {subject}",
    "the {subject} and the {subject2} in the {place}",
    "solo {people} {pose}",
    "a {subject}",
    "the {colour} {subject}",
    "a {colour} {subject} at the {row} {col} on a {colour2} background",
    "a {subject} at the {row} {col}",
    "a {adjective} {subject} {pose} in the {place} at {time}",
    "a {medium} of a {adjective} {colour} {subject} in the {place}",
    "a {adjective} {subject} with a {colour} {subject2}",
    "a {subject} {pose} with a {adjective} {subject2} in the {place} at {time}",
    "two {subject} and a {colour} {subject2} in the {place}",
)

#: Candidate words for ``T(word)`` prompts: every pool word plus a few more content words.
TEMPLATE_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        itertools.chain.from_iterable(WORD_POOLS[k] for k in ("subject", "people", "colour", "place", "adjective", "medium"))
    )
) + ("anime", "hair", "solo", "background", "monster", "angel", "ninja", "pirate",
     "samurai", "wizard", "detective", "idol", "maid", "nurse", "chef", "vampire", "ghost", "alien")


@dataclass
class PromptSet:
    """A named list of sentences and where it came from."""

    name: str
    sentences: list[str]
    source: str = ""

    @property
    def hash(self) -> str:
        """First 16 hex digits of the SHA-256 of the sentences joined by newlines."""
        return hashlib.sha256("\n".join(self.sentences).encode("utf-8")).hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "size": len(self.sentences), "hash": self.hash, "source": self.source}


def token_count(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without BOS/EOS."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def single_token_words(tokenizer, words) -> list[str]:
    """The words of ``words`` (order kept, duplicates dropped) that are exactly one token."""
    return [w for w in dict.fromkeys(words) if token_count(tokenizer, w) == 1]


def _slots(template: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", template)


def _pool_name(slot: str) -> str:
    return slot.rstrip("0123456789")


def builtin_sentences(tokenizer, size: int = DEFAULT_BUILTIN_SIZE, seed: int = 0) -> list[str]:
    """Up to ``size`` distinct sentences from :data:`BUILTIN_TEMPLATES` x :data:`WORD_POOLS`.

    Deterministic for a tokenizer and seed. Only single-token words are used and only templates
    whose fixed words are single tokens, so every word of every sentence is one token and token
    positions are word positions (plus BOS). Templates are drawn in turn, words at random.
    """
    pools = {name: single_token_words(tokenizer, words) for name, words in WORD_POOLS.items()}
    usable = []
    for template in BUILTIN_TEMPLATES:
        fixed = re.sub(r"\{\w+\}", " ", template).split()
        if all(pools.get(_pool_name(s)) for s in _slots(template)) and all(token_count(tokenizer, w) == 1 for w in fixed):
            usable.append(template)
    if not usable:
        raise ValueError("no built-in template is usable with this tokenizer (its words are not single tokens)")
    rng = random.Random(seed)
    out: dict[str, None] = {}
    attempts = 0
    while len(out) < size and attempts < 50 * size:
        template = usable[attempts % len(usable)]
        attempts += 1
        words = {s: rng.choice(pools[_pool_name(s)]) for s in _slots(template)}
        out.setdefault(template.format(**words), None)
    return list(out)


def template_word_sentences(tokenizer, template: str = DEFAULT_TEMPLATE, words=None) -> list[str]:
    """``template.format(word)`` for every single-token word of ``words`` (default :data:`TEMPLATE_WORDS`)."""
    return [template.format(w) for w in single_token_words(tokenizer, TEMPLATE_WORDS if words is None else words)]


def template_word_index(tokenizer, template: str = DEFAULT_TEMPLATE) -> int:
    """The token index a one-token word takes in ``template`` (5 for the default with BOS at 0)."""
    prefix = template.split("{}")[0].strip()
    return 1 + (token_count(tokenizer, prefix) if prefix else 0)


def read_sentences(path: str | Path) -> list[str]:
    """Sentences from a file: a COCO-style captions JSON (``annotations[].caption``; a JSON list of
    strings also works) or a text file with one sentence per line (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(path_not_found(path, "sentence file"))
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if path.suffix.lower() == ".json":
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc
            data = None
        if isinstance(data, dict):
            if not isinstance(data.get("annotations"), list):
                raise ValueError(f"{path}: a captions JSON needs a list 'annotations' of {{'caption': ...}} objects")
            sentences = [str(a["caption"]).strip() for a in data["annotations"] if isinstance(a, dict) and "caption" in a]
        elif isinstance(data, list):
            if bad := [item for item in data if not isinstance(item, str)]:
                raise ValueError(f"{path}: a JSON list must hold sentences (strings), got {json.dumps(bad[0])[:60]}")
            sentences = [s.strip() for s in data]
        else:
            sentences = None
        if sentences is not None:
            sentences = [s for s in sentences if s]
            if not sentences:
                raise ValueError(f"{path}: no captions found")
            return sentences
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise ValueError(f"{path}: no sentences (expected one sentence per line)")
    return sentences


def build_prompt_set(
    tokenizer,
    sentences_file: str | Path | None = None,
    template_words: str = "off",
    template: str = DEFAULT_TEMPLATE,
    max_sentences: int | None = None,
    builtin_size: int = DEFAULT_BUILTIN_SIZE,
    seed: int = 0,
) -> PromptSet:
    """The sentence set of a check.

    Base set: ``sentences_file`` (see :func:`read_sentences`) or the built-in set. ``template_words``:
    ``"off"``; ``"add"`` appends ``T(word)`` prompts to the base set; ``"only"`` uses them alone.
    ``max_sentences`` keeps a deterministic random subset (seed ``seed``, original order kept) of
    that many sentences.
    """
    if template_words not in ("off", "add", "only"):
        raise ValueError(f"template_words must be 'off', 'add' or 'only', got {template_words!r}")
    parts, sentences = [], []
    if template_words != "only":
        if sentences_file:
            sentences += read_sentences(sentences_file)
            parts.append(f"file:{Path(sentences_file).name}")
        else:
            sentences += builtin_sentences(tokenizer, size=builtin_size, seed=seed)
            parts.append("builtin-v1")
    if template_words != "off":
        words = template_word_sentences(tokenizer, template)
        if not words:
            raise ValueError(f"no single-token word fits the template {template!r} with this tokenizer")
        sentences += words
        parts.append(f"T(word)[{template}]")
    source = " + ".join(parts)
    if max_sentences is not None and len(sentences) > max_sentences:
        keep = sorted(random.Random(seed).sample(range(len(sentences)), max_sentences))
        sentences = [sentences[i] for i in keep]
        source += f" (random subset of {max_sentences}, seed {seed})"
    return PromptSet(name=" + ".join(parts), sentences=sentences, source=source)
