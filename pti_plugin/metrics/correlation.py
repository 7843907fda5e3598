"""Agreement between two measurements of the same runs: Pearson and Spearman correlation.

The research bench uses it to ask whether a model-internal metric (e.g. the attention-based
leakage score) ranks runs as the ground truth does. Pairs where either value is missing or not
finite are dropped; ``n`` says how many remained. Spearman's rho is Pearson's r of the ranks,
ties sharing their mean rank. Below 3 pairs, or when one side is constant, both are nan.

:func:`within_group_spearman` asks the same inside groups (runs of one learning rate), leaving
out the agreement the groups alone would give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .replication import resampled_interval


def _pairs(x: Sequence, y: Sequence) -> tuple[np.ndarray, np.ndarray]:
    keep = [(float(a), float(b)) for a, b in zip(x, y, strict=True)
            if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    arr = np.asarray(keep, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return out


def correlation(x: Sequence, y: Sequence) -> dict[str, float | int]:
    """``{"pearson", "spearman", "n"}`` of the finite pairs of ``x`` and ``y`` (equal lengths)."""
    a, b = _pairs(x, y)
    return {"pearson": _pearson(a, b), "spearman": _pearson(ranks(a), ranks(b)), "n": int(len(a))}


def correlation_interval(x: Sequence, y: Sequence, draws: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """:func:`correlation` plus a percentile bootstrap interval on Spearman's rho (``spearman_lo``,
    ``spearman_hi``) from ``draws`` resamples of the pairs; resamples where one side is constant are left
    out. Both ends are nan below 3 pairs."""
    out = correlation(x, y)
    a, b = _pairs(x, y)
    if len(a) < 3:
        return out | {"spearman_lo": float("nan"), "spearman_hi": float("nan")}
    rho = resampled_interval(len(a), lambda p: _pearson(ranks(a[p]), ranks(b[p])), draws, level, seed)
    return out | {"spearman_lo": rho.lo, "spearman_hi": rho.hi}


def _mean_rho_within(a: np.ndarray, b: np.ndarray, members: list[np.ndarray]) -> tuple[float, int, int]:
    """Spearman's rho inside each group of indices ``members``, averaged with weights = pairs per group
    over the groups where it is defined; also the pairs and groups it is over."""
    rhos = [(_pearson(ranks(a[m]), ranks(b[m])), len(m)) for m in members]
    kept = [(rho, n) for rho, n in rhos if math.isfinite(rho)]
    if not kept:
        return float("nan"), 0, 0
    total = sum(n for _, n in kept)
    return sum(rho * n for rho, n in kept) / total, total, len(kept)


def within_group_spearman(x: Sequence, y: Sequence, groups: Sequence, draws: int = 2000, level: float = 0.95,
                          seed: int = 0) -> dict:
    """Spearman's rho of ``x`` and ``y`` inside each group (``groups[k]``: the group of pair k, e.g. a run's
    learning rate; None leaves the pair out), averaged over the groups with weights = their pairs.

    It asks whether ``x`` ranks items *that share a group* as ``y`` does, leaving out the agreement the
    groups alone would give (runs at a low rate sitting low on both). A group counts where its rho is
    defined (at least 3 finite pairs, neither side constant). Interval: percentile bootstrap over
    ``draws`` resamples of the pairs within each group. Returns ``{"spearman", "spearman_lo",
    "spearman_hi", "n", "groups"}`` (``n``: pairs in the groups that count); nan where no group counts.
    """
    kept = [(float(a), float(b), g) for a, b, g in zip(x, y, groups, strict=True)
            if g is not None and a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    a = np.array([k[0] for k in kept], dtype=np.float64)
    b = np.array([k[1] for k in kept], dtype=np.float64)
    names = list(dict.fromkeys(k[2] for k in kept))
    labels = np.array([names.index(k[2]) for k in kept], dtype=np.int64)  # [pairs] group index
    members = [np.flatnonzero(labels == g) for g in range(len(names))]
    estimate, n, counted = _mean_rho_within(a, b, members)
    out = {"spearman": estimate, "n": n, "groups": counted, "spearman_lo": float("nan"), "spearman_hi": float("nan")}
    if counted == 0:
        return out
    rho = resampled_interval(len(a), lambda p: _mean_rho_within(a, b, [p[labels[p] == g] for g in range(len(names))])[0],
                             draws, level, seed, strata=members)
    return out | {"spearman_lo": rho.lo, "spearman_hi": rho.hi}
