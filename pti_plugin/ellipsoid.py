"""The ellipsoid check: is a slerp about the centre legitimate at a given token index?

METHOD.md sections 2-3, DECISIONS.md "Analysis". The notes' argument: CLIP's text outputs lie on an
ellipsoid (shown for the end-of-text token), so moving on it is a slerp about its centre. The UNet
reads the output of *every* token, so the check embeds a sentence set and measures, at the studied
token index (5 = ``tok1`` in ``an anime illustration of tok1``), whether the norm of the output
about its empirical centre varies little relative to its mean.

What is measured (all on the UNet conditioning ``h``: the final LayerNorm of the ``clip_skip``
layer's state, ``[N, 77, d]``):

- **per token index** ``i``: mean, standard deviation and coefficient of variation (CV = std /
  mean, population std) of ``|h[n, i]|`` (about the origin) and of ``|h[n, i] - c_i|`` (about the
  empirical centre ``c_i``), over the sentences that have a *word* at ``i``, i.e. ``i`` before the
  sentence's EOS (index 0, BOS, counts; it is the same state for every sentence, so its CV about
  the centre is undefined and reported as null). ``c_i`` is the mean of those same states.
  **Padding**: positions after a sentence's EOS (CLIP pads with copies of the EOS token, whose
  outputs attend to the whole sentence) and the EOS itself are left out of the per-index curves
  and of ``c_i``;
- **EOS**: its position varies per sentence, so its state is gathered at each sentence's EOS
  position (the first EOS id after BOS; 76 for truncated sentences) and the same statistics are
  taken about the origin and about the mean EOS state;
- **LayerNorm structure** (METHOD.md section 3): ``h = gamma * xhat + beta`` with ``xhat`` the
  normalised pre-LayerNorm state, computed from that state as the LayerNorm does (never by
  dividing by gamma). ``|xhat| / sqrt(d)`` is reported (mean, min, max over every position of
  every sentence); it is ``sqrt(var / (var + eps))``, i.e. 1 up to the LayerNorm's eps. It is a
  *consistency check* (1 by construction, so every output lies exactly on the ellipsoid centred
  at beta with axes gamma), not evidence for the notes' claim; the conditioning is also checked
  to equal ``gamma * xhat + beta`` to float precision.

**Verdict** (the decisive statistic, DECISIONS.md): with ``cv_index`` the CV of the norm about the
centre at the studied index and ``cv_eos`` the same at EOS (where the double-ellipsoid paper shows
the ellipsoid), slerp about the centre at the index is **supported** when

    cv_index <= max(threshold, eos_factor * cv_eos)        (defaults: threshold 0.10, eos_factor 1.5)

i.e. the index's shell is as thin as a shell of relative thickness 10 % (one standard deviation
of the radius within 10 % of its mean), or at most 1.5 times as thick as the EOS shell that the
paper accepts as an ellipsoid. Fewer than :data:`MIN_SAMPLES` sentences with a word at the index
give "inconclusive".

Sentence sets: a built-in set generated from templates x word pools (no download; only sentences
whose every word is one token for the model's tokenizer are kept, so the toy word-level vocabulary
works too), ``T(word)`` prompts (``an anime illustration of {}`` over many single-token words, so
the studied index is always a content word), a text file (one sentence per line) or a COCO-style
captions JSON (``annotations[].caption``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_INDEX = 5
DEFAULT_TEMPLATE = "an anime illustration of {}"
#: Verdict: supported when cv_index <= max(DEFAULT_THRESHOLD, DEFAULT_EOS_FACTOR * cv_eos).
DEFAULT_THRESHOLD = 0.10
DEFAULT_EOS_FACTOR = 1.5
#: Fewer sentences than this with a word at the studied index make the verdict "inconclusive".
MIN_SAMPLES = 20
#: Size of the built-in template x words sentence set.
DEFAULT_BUILTIN_SIZE = 600
#: A mean radius about the centre below this fraction of the mean norm about the origin means every
#: sentence has the same state at that index (e.g. BOS): the CV about the centre is undefined.
DEGENERATE_RADIUS = 1e-5

# --------------------------------------------------------------------------- sentence sets

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
        raise FileNotFoundError(f"sentence file not found: {path.resolve()}")
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
            sentences = [str(s).strip() for s in data]
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


# --------------------------------------------------------------------------- statistics


@dataclass
class NormStats:
    """Norm statistics of a set of vectors: count, mean, population std, CV = std / mean (None when undefined)."""

    n: int
    mean: float | None
    std: float | None
    cv: float | None

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "std": self.std, "cv": self.cv}


def norm_stats(radii: np.ndarray, degenerate_below: float = 0.0) -> NormStats:
    """Statistics of the norms ``radii`` ``[n]``; CV is None when n < 2 or mean <= ``degenerate_below``."""
    radii = np.asarray(radii, dtype=np.float64)
    n = int(radii.size)
    if n == 0:
        return NormStats(0, None, None, None)
    mean = float(radii.mean())
    std = float(radii.std())
    cv = std / mean if n >= 2 and mean > degenerate_below and mean > 0 else None
    return NormStats(n, mean, std, cv)


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Per sentence, the index of its EOS token: the first ``eos_token_id`` after position 0 ``[N]``.

    CLIP pads with the EOS id, so the first one is the real EOS; a truncated sentence has it at the
    last position. Without any EOS id the last position is used.
    """
    hits = input_ids[:, 1:] == eos_token_id
    first = hits.int().argmax(dim=1) + 1
    return torch.where(hits.any(dim=1), first, torch.full_like(first, input_ids.shape[1] - 1))


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states[n, positions[n]]`` for each n: ``[N, L, d], [N] -> [N, d]``."""
    return states[torch.arange(states.shape[0], device=states.device), positions.to(states.device)]


def word_mask(eos: torch.Tensor, length: int) -> torch.Tensor:
    """``[N, L]`` True where the sentence has a word (or BOS) at that index: index < its EOS position."""
    return torch.arange(length).unsqueeze(0) < eos.unsqueeze(1).cpu()


def whitened_norm_ratio(pre_ln: torch.Tensor, eps: float) -> torch.Tensor:
    """``|xhat| / sqrt(d)`` per token (float64), with ``xhat`` the LayerNorm-normalised pre-LayerNorm state."""
    x = pre_ln.double()
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return xhat.norm(dim=-1) / math.sqrt(x.shape[-1])


def shell_context(vectors: torch.Tensor) -> dict:
    """Context for a CV: the participation ratio ``d_eff = tr(C)^2 / tr(C^2)`` of the covariance ``C``
    of ``vectors`` ``[n, d]`` (about their mean), and ``1 / sqrt(2 d_eff)``, the CV of the norm that a
    Gaussian cloud with that covariance would have (any high-dimensional cloud has a thin shell; a
    measured CV well above it means the radius varies more than chance)."""
    if vectors.shape[0] < 2:
        return {"effective_dim": None, "gaussian_cv": None}
    centred = vectors.double() - vectors.double().mean(0)
    n, d = centred.shape
    # the covariance, or the Gram matrix (same non-zero spectrum) when there are fewer vectors than dimensions
    gram = (centred.T @ centred if d <= n else centred @ centred.T) / n
    tr, tr2 = float(torch.trace(gram)), float((gram * gram).sum())
    if tr <= 0 or tr2 <= 0:
        return {"effective_dim": None, "gaussian_cv": None}
    d_eff = tr * tr / tr2
    return {"effective_dim": d_eff, "gaussian_cv": 1.0 / math.sqrt(2.0 * d_eff)}


def verdict(
    cv_index: float | None,
    cv_eos: float | None,
    n_index: int,
    threshold: float = DEFAULT_THRESHOLD,
    eos_factor: float = DEFAULT_EOS_FACTOR,
    index: int = DEFAULT_INDEX,
    min_samples: int = MIN_SAMPLES,
) -> dict:
    """The verdict: ``supported`` (True/False/None), ``label``, ``limit``, ``rule`` and the printed ``line``."""
    rule = (
        f"slerp about the centre at index {index} is supported when CV(index) <= max(threshold, "
        f"eos_factor x CV(EOS)) with threshold = {threshold:g}, eos_factor = {eos_factor:g}; "
        f"CV = std/mean of |h - centre| over the sentences with a word at the index (EOS: its own centre)"
    )
    limit = None
    if cv_index is None or n_index < min_samples:
        supported, label = None, "inconclusive"
        why = f"only {n_index} sentences have a word at index {index} (need {min_samples})" if n_index < min_samples else (
            f"CV at index {index} undefined (every sentence has the same state there)")
        line = f"VERDICT: inconclusive: {why}"
    else:
        limit = max(threshold, eos_factor * cv_eos) if cv_eos is not None else threshold
        supported = cv_index <= limit
        label = "supported" if supported else "not supported"
        eos_txt = f"{cv_eos:.4f}" if cv_eos is not None else "n/a"
        line = (
            f"VERDICT: slerp about the centre at index {index} is {label.upper()}: CV(index {index}) = {cv_index:.4f} "
            f"{'<=' if supported else '>'} max({threshold:g}, {eos_factor:g} x CV(EOS) = {eos_factor:g} x {eos_txt}) = {limit:.4f}"
        )
    return {"supported": supported, "label": label, "limit": limit, "rule": rule, "line": line}


# --------------------------------------------------------------------------- encoding


@dataclass
class Encoder:
    """What the check needs of a model: its text encoder, tokenizer and family adapter (``models.family``)."""

    text_encoder: torch.nn.Module
    tokenizer: object
    family: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_base_model(cls, model, device: str | torch.device = "cpu") -> "Encoder":
        return cls(model.text_encoder, model.tokenizer, model.family, torch.device(device))

    @property
    def layer_norm(self) -> torch.nn.LayerNorm | None:
        ln = self.family.final_layer_norms((self.text_encoder,))[0]
        return ln if isinstance(ln, torch.nn.LayerNorm) else None

    @property
    def eos_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id: the EOS position cannot be found")
        return int(eos)


def text_encoder_hash(text_encoder: torch.nn.Module) -> str:
    """Short identity of the text encoder weights: first 16 hex digits of a SHA-256 over its state
    dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class EllipsoidResult:
    """Everything the check measured. Arrays are numpy; ``to_json`` gives the JSON-ready dict."""

    index: int
    num_sentences: int
    dim: int
    clip_skip: int
    index_origin: NormStats
    index_centre: NormStats
    eos_origin: NormStats
    eos_centre: NormStats
    layernorm: dict
    verdict: dict
    threshold: float
    eos_factor: float
    #: per-index curves, ``[L]`` arrays (NaN where undefined) and counts
    curves: dict
    eos_position_counts: dict
    #: covariance context at the index and at EOS (see :func:`shell_context`)
    shell: dict
    #: distinct token prefixes ``0..index`` among the sentences with a word at the index (sentences
    #: sharing a prefix share their state there)
    distinct_at_index: int
    #: tensors for the centre file
    centre: torch.Tensor
    centre_all_tokens: torch.Tensor
    eos_centre_vector: torch.Tensor
    word_count: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    #: per-sentence radii about the centre at the index (sentences with a word there) and at EOS
    index_radii: np.ndarray
    eos_radii: np.ndarray

    def to_json(self) -> dict:
        def clean(values):
            return [None if v is None or not np.isfinite(v) else float(v) for v in values]

        curves = {
            "count": [int(c) for c in self.curves["count"]],
            **{
                f"{kind}_{stat}": clean(self.curves[kind][stat])
                for kind in ("origin", "centre")
                for stat in ("mean", "std", "cv")
            },
        }
        return {
            "index": self.index,
            "cv_about_centre": self.index_centre.cv,
            "eos_cv_about_centre": self.eos_centre.cv,
            "layernorm_whitened_norm_ratio": self.layernorm.get("whitened_norm_ratio_mean"),
            "cv_about_origin": self.index_origin.cv,
            "eos_cv_about_origin": self.eos_origin.cv,
            "verdict": self.verdict["label"],
            "supported": self.verdict["supported"],
            "verdict_line": self.verdict["line"],
            "rule": self.verdict["rule"],
            "threshold": self.threshold,
            "eos_factor": self.eos_factor,
            "limit": self.verdict["limit"],
            "num_sentences": self.num_sentences,
            "width": self.dim,
            "clip_skip": self.clip_skip,
            "at_index": {"origin": self.index_origin.to_dict(), "centre": self.index_centre.to_dict()},
            "at_eos": {"origin": self.eos_origin.to_dict(), "centre": self.eos_centre.to_dict()},
            "layernorm": self.layernorm,
            "shell_context": self.shell,
            "distinct_prefixes_at_index": self.distinct_at_index,
            "eos_position_counts": {str(k): v for k, v in sorted(self.eos_position_counts.items())},
            "per_index": curves,
            "conventions": CONVENTIONS,
        }


#: How token indices, padding and centres are defined (recorded in the JSON and the centre file).
CONVENTIONS = {
    "token_index": "0 = BOS (<|startoftext|>); words from 1; EOS at each sentence's first EOS id after BOS "
    "(76 when truncated); positions after EOS are padding (CLIP pads with the EOS id)",
    "per_index_samples": "sentences with a word (or BOS) at the index, i.e. index < EOS position; EOS and "
    "padding positions are excluded",
    "centre": "per index: mean UNet conditioning over the sentences with a word at that index; indices where "
    "no sentence has a word use the mean over all sentences (EOS/padding states)",
    "centre_all_tokens": "per index: mean over all sentences whatever the token there (word, EOS or padding), "
    "as the pivot-locality plugin's built-in estimate",
    "eos_centre": "mean EOS state, gathered at each sentence's EOS position",
    "std": "population standard deviation (ddof = 0); CV = std / mean",
    "conditioning": "final LayerNorm applied to the hidden state clip_skip layers from the end (kohya's clip_skip)",
}


@torch.no_grad()
def _encode_batch(enc: Encoder, ids: torch.Tensor, use_ln: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(conditioning ``[B, L, d]``, pre-LayerNorm state or None), float32 on the CPU."""
    ids = ids.to(enc.device)
    te = enc.text_encoder
    if use_ln:
        x = enc.family.pre_layernorm_states((te,), ids)
        return enc.layer_norm(x).float().cpu(), x.float().cpu()
    return enc.family.encode((te,), ids).hidden_states.float().cpu(), None


def analyse(
    model_or_encoder,
    sentences: list[str],
    index: int = DEFAULT_INDEX,
    threshold: float = DEFAULT_THRESHOLD,
    eos_factor: float = DEFAULT_EOS_FACTOR,
    batch_size: int = 64,
    cache_bytes: int = 1 << 30,
    min_samples: int = MIN_SAMPLES,
) -> EllipsoidResult:
    """Run the check on ``sentences`` with a BaseModel or an :class:`Encoder`.

    Two passes over the batches (centres first, then norms about them); the first pass's outputs
    are kept in memory when they fit in ``cache_bytes``, else re-encoded.
    """
    enc = model_or_encoder if isinstance(model_or_encoder, Encoder) else Encoder.from_base_model(model_or_encoder)
    if not sentences:
        raise ValueError("the sentence set is empty")
    was_training = enc.text_encoder.training
    enc.text_encoder.eval()
    try:
        return _analyse(enc, sentences, index, threshold, eos_factor, batch_size, cache_bytes, min_samples)
    finally:
        enc.text_encoder.train(was_training)


def _analyse(enc, sentences, index, threshold, eos_factor, batch_size, cache_bytes, min_samples) -> EllipsoidResult:
    family, ln = enc.family, enc.layer_norm
    ids_all = family.tokenize((enc.tokenizer,), list(sentences))
    n, length = ids_all.shape
    if not 0 <= index < length:
        raise ValueError(f"index {index} is outside the token range 0..{length - 1}")
    eos = eos_positions(ids_all, enc.eos_token_id)
    mask = word_mask(eos, length)  # [N, L]
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    # Is the conditioning exactly the final LayerNorm of the pre-LayerNorm state? (checked on batch 0)
    use_ln, recon_err = False, None
    if ln is not None:
        with torch.no_grad():
            ref = family.encode((enc.text_encoder,), ids_all[batches[0]].to(enc.device)).hidden_states.double().cpu()
        h0, x0 = _encode_batch(enc, ids_all[batches[0]], use_ln=True)
        gamma, beta = ln.weight.detach().double().cpu(), ln.bias.detach().double().cpu()
        x = x0.double()
        xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
        recon_err = float((gamma * xhat + beta - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        use_ln = recon_err < 1e-4
        if not use_ln:
            logger.warning("the conditioning is not the final LayerNorm of the pre-LayerNorm state (relative error %.2e)", recon_err)

    d = None
    sum_word = sum_all = None
    origin_r = torch.zeros(n, length, dtype=torch.float64)
    ratio = torch.full((n, length), float("nan"), dtype=torch.float64) if ln is not None else None
    eos_vecs = None
    cache: list[torch.Tensor] | None = []
    cached = 0
    for sl in batches:
        h, x = _encode_batch(enc, ids_all[sl], use_ln)
        d = h.shape[-1]
        if sum_word is None:
            sum_word = torch.zeros(length, d, dtype=torch.float64)
            sum_all = torch.zeros(length, d, dtype=torch.float64)
            eos_vecs = torch.zeros(n, d, dtype=torch.float64)
            index_vecs = torch.zeros(n, d, dtype=torch.float64)
        h64 = h.double()
        m = mask[sl].unsqueeze(-1)
        sum_word += (h64 * m).sum(0)
        sum_all += h64.sum(0)
        origin_r[sl] = h64.norm(dim=-1)
        eos_vecs[sl] = gather_positions(h64, eos[sl])
        index_vecs[sl] = h64[:, index]
        if ratio is not None:
            if x is None:
                with torch.no_grad():
                    x = family.pre_layernorm_states((enc.text_encoder,), ids_all[sl].to(enc.device)).float().cpu()
            ratio[sl] = whitened_norm_ratio(x, ln.eps)
        if cache is not None:
            cached += h.numel() * h.element_size()
            if cached <= cache_bytes:
                cache.append(h)
            else:
                cache = None  # too large to keep: the second pass re-encodes

    count = mask.sum(0)  # [L]
    centre_all = sum_all / n
    centre = torch.where(count.unsqueeze(-1) > 0, sum_word / count.clamp_min(1).unsqueeze(-1), centre_all)

    centre_r = torch.zeros(n, length, dtype=torch.float64)
    for k, sl in enumerate(batches):
        h = cache[k] if cache is not None else _encode_batch(enc, ids_all[sl], use_ln)[0]
        centre_r[sl] = (h.double() - centre.unsqueeze(0)).norm(dim=-1)

    # per-index curves over sentences with a word at the index
    curves = {"count": count.numpy(), "origin": {}, "centre": {}}
    per = {"origin": [], "centre": []}
    for i in range(length):
        sel = mask[:, i]
        o = norm_stats(origin_r[sel, i].numpy())
        c = norm_stats(centre_r[sel, i].numpy(), degenerate_below=DEGENERATE_RADIUS * (o.mean or 0.0))
        per["origin"].append(o)
        per["centre"].append(c)
    for kind in ("origin", "centre"):
        for stat in ("mean", "std", "cv"):
            curves[kind][stat] = np.array([getattr(s, stat) if getattr(s, stat) is not None else np.nan for s in per[kind]])

    eos_centre = eos_vecs.mean(0)
    eos_origin_r = eos_vecs.norm(dim=-1).numpy()
    eos_centre_r = (eos_vecs - eos_centre).norm(dim=-1).numpy()
    eos_o = norm_stats(eos_origin_r)
    eos_c = norm_stats(eos_centre_r, degenerate_below=DEGENERATE_RADIUS * (eos_o.mean or 0.0))

    sel = mask[:, index]
    shape = {"index": shell_context(index_vecs[sel]), "eos": shell_context(eos_vecs)}

    layernorm: dict = {"present": ln is not None}
    if ln is not None:
        real = torch.isfinite(ratio)
        valid = ratio[real]
        layernorm.update(
            {
                "whitened_norm_ratio_mean": float(valid.mean()),
                "whitened_norm_ratio_min": float(valid.min()),
                "whitened_norm_ratio_max": float(valid.max()),
                "whitened_norm_ratio_at_index": float(ratio[mask[:, index], index].mean()) if mask[:, index].any() else None,
                "whitened_norm_ratio_at_eos": float(gather_positions(ratio.unsqueeze(-1), eos).mean()),
                "eps": float(ln.eps),
                "reconstruction_relative_error": recon_err,
                "conditioning_is_layernorm": bool(use_ln),
                "note": "consistency check, 1 by construction (|xhat| = sqrt(d var/(var+eps))); not evidence",
            }
        )
    result_verdict = verdict(per["centre"][index].cv, eos_c.cv, int(sel.sum()), threshold, eos_factor, index, min_samples)
    eos_counts: dict[int, int] = {}
    for p in eos.tolist():
        eos_counts[p] = eos_counts.get(p, 0) + 1
    return EllipsoidResult(
        index=index,
        num_sentences=n,
        dim=int(d),
        clip_skip=int(getattr(family, "clip_skip", 1)),
        index_origin=per["origin"][index],
        index_centre=per["centre"][index],
        eos_origin=eos_o,
        eos_centre=eos_c,
        layernorm=layernorm,
        verdict=result_verdict,
        threshold=threshold,
        eos_factor=eos_factor,
        curves=curves,
        eos_position_counts=eos_counts,
        shell=shape,
        distinct_at_index=int(torch.unique(ids_all[sel, : index + 1], dim=0).shape[0]) if sel.any() else 0,
        centre=centre.float(),
        centre_all_tokens=centre_all.float(),
        eos_centre_vector=eos_centre.float(),
        word_count=count.to(torch.int64),
        gamma=ln.weight.detach().float().cpu().clone() if ln is not None else None,
        beta=ln.bias.detach().float().cpu().clone() if ln is not None else None,
        index_radii=centre_r[sel, index].numpy(),
        eos_radii=eos_centre_r,
    )


def save_result_centre_file(path, result: EllipsoidResult, metadata: dict) -> Path:
    """Write ``result``'s centres as a centre file (:mod:`pti_plugin.centre_file`) with ``metadata``.

    Encoders without a final LayerNorm get gamma = 1 and beta = 0 (recorded as ``layernorm: false``).
    """
    from .centre_file import save_centre_file

    d = result.dim
    gamma = result.gamma if result.gamma is not None else torch.ones(d)
    beta = result.beta if result.beta is not None else torch.zeros(d)
    meta = {
        "layernorm": result.gamma is not None,
        "clip_skip": result.clip_skip,
        "studied_index": result.index,
        "conventions": CONVENTIONS,
        **metadata,
    }
    extra = {
        "centre_all_tokens": result.centre_all_tokens,
        "eos_centre": result.eos_centre_vector,
        "word_count": result.word_count,
    }
    return save_centre_file(path, result.centre, gamma, beta, meta, extra_tensors=extra)
