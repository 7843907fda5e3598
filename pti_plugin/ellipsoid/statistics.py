"""Statistics of the ellipsoid check: norm statistics, EOS positions, shell context and the verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_INDEX = 5
#: Verdict: supported when cv_index <= max(DEFAULT_THRESHOLD, DEFAULT_EOS_FACTOR * cv_eos).
DEFAULT_THRESHOLD = 0.10
DEFAULT_EOS_FACTOR = 1.5
#: Fewer sentences than this with a word at the studied index make the verdict "inconclusive".
MIN_SAMPLES = 20
#: A mean radius about the centre below this fraction of the mean norm about the origin means every
#: sentence has the same state at that index (e.g. BOS): the CV about the centre is undefined.
DEGENERATE_RADIUS = 1e-5


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
