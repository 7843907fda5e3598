"""The ellipsoid check: is a slerp about the centre legitimate at a given token index?

docs/method.md, "Is slerp legitimate at token index 5?". The argument: CLIP's text outputs lie on an
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
- **LayerNorm structure** (docs/method.md, "Where to interpolate, and how"): ``h = gamma * xhat + beta`` with ``xhat`` the
  normalised pre-LayerNorm state, computed from that state as the LayerNorm does (never by
  dividing by gamma). ``|xhat| / sqrt(d)`` is reported (mean, min, max over every position of
  every sentence); it is ``sqrt(var / (var + eps))``, i.e. 1 up to the LayerNorm's eps. It is a
  *consistency check* (1 by construction, so every output lies exactly on the ellipsoid centred
  at beta with axes gamma), not evidence for the ellipsoid claim; the conditioning is also checked
  to equal ``gamma * xhat + beta`` to float precision.

**Verdict** (the decisive statistic): with ``cv_index`` the CV of the norm about the
centre at the studied index and ``cv_eos`` the same at EOS (where the double-ellipsoid paper shows
the ellipsoid), slerp about the centre at the index is **supported** when

    cv_index <= max(threshold, eos_factor * cv_eos)        (defaults: threshold 0.10, eos_factor 1.5)

i.e. the index's shell is as thin as a shell of relative thickness 10 % (one standard deviation
of the radius within 10 % of its mean), or at most 1.5 times as thick as the EOS shell that the
paper accepts as an ellipsoid. Fewer than :data:`MIN_SAMPLES` sentences with a word at the index
give "inconclusive".

**Several text encoders** (SDXL): the conditioning ``[N, 77, d1 + d2]`` is the two encoders'
penultimate states side by side, so every statistic above is taken per encoder on its slice of the
width (:func:`analyse_per_encoder`, one result each; token positions from that encoder's own ids),
and the verdict is supported when every encoder's is. SDXL's conditioning has no final LayerNorm:
the exact LayerNorm geometry does not apply, the LayerNorm figures are absent, and the norm CV about
the centre at the index and at EOS, per encoder, is what decides whether the pivot-locality
plugin's ``centered`` geometry (slerp about the centre, per encoder) is legitimate at the index.

Sentence sets: a built-in set generated from templates x word pools (no download; only sentences
whose every word is one token for the model's tokenizer are kept, so the toy word-level vocabulary
works too), ``T(word)`` prompts (``an anime illustration of {}`` over many single-token words, so
the studied index is always a content word), a text file (one sentence per line) or a COCO-style
captions JSON (``annotations[].caption``).
"""

from .check import Block, Encoder, analyse, analyse_per_encoder, text_encoder_hash
from .prompts import (
    BUILTIN_TEMPLATES,
    DEFAULT_BUILTIN_SIZE,
    DEFAULT_TEMPLATE,
    TEMPLATE_WORDS,
    WORD_POOLS,
    PromptSet,
    build_prompt_set,
    builtin_sentences,
    read_sentences,
    single_token_words,
    template_word_index,
    template_word_sentences,
    token_count,
)
from .report import (
    CONVENTIONS,
    CONVENTIONS_PER_ENCODER,
    NO_LAYERNORM_LINE,
    EllipsoidResult,
    overall_verdict,
    save_result_centre_file,
)
from .statistics import (
    DEFAULT_EOS_FACTOR,
    DEFAULT_INDEX,
    DEFAULT_THRESHOLD,
    DEGENERATE_RADIUS,
    MIN_SAMPLES,
    NormStats,
    eos_positions,
    gather_positions,
    norm_stats,
    shell_context,
    verdict,
    whitened_norm_ratio,
    word_mask,
)

__all__ = [
    "BUILTIN_TEMPLATES", "Block", "CONVENTIONS", "CONVENTIONS_PER_ENCODER", "DEFAULT_BUILTIN_SIZE",
    "DEFAULT_EOS_FACTOR", "DEFAULT_INDEX", "DEFAULT_TEMPLATE", "DEFAULT_THRESHOLD", "DEGENERATE_RADIUS",
    "MIN_SAMPLES", "NO_LAYERNORM_LINE", "TEMPLATE_WORDS", "WORD_POOLS", "EllipsoidResult", "Encoder", "NormStats",
    "PromptSet", "analyse", "analyse_per_encoder", "build_prompt_set", "builtin_sentences", "eos_positions",
    "gather_positions", "norm_stats", "overall_verdict", "read_sentences", "save_result_centre_file",
    "shell_context", "single_token_words", "template_word_index", "template_word_sentences",
    "text_encoder_hash", "token_count", "verdict", "whitened_norm_ratio", "word_mask",
]
