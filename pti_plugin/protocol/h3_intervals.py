"""Two-level intervals of H3's per-seed readings: the training seeds, and the sampling seeds they share.

Every H3 cell, each training seed's pivot alone (lr 0) and the null's set ``a`` draw image ``j`` from
sampling seed ``j`` with the same neutral prompt (:func:`~.premise.sample`, :func:`~.premise.neutral_prompts`),
so their images are paired image by image: the sampling seeds are *crossed* with the training seeds, the
learning rates, the conditions and the null, not nested in them. A reading that is a function of one
training seed's images (where its curve first reaches a target along the learning rates, the highest
detail it reaches, the best detail under a leakage ceiling, its share of images in a training cell minus
the null's) gets its interval from draws that resample both levels:

- the sampling seeds: one resample of the image indices per draw (:class:`ImageDraws`), the same for
  every training seed, learning rate and condition and for the null, so that a paired difference (a
  condition minus no regulariser, a cell minus the null) keeps its pairing, and what an image brings to
  both sides cancels;
- the training seeds: drawn with replacement from those whose reading is finite (the seeds the estimate
  is over); a draw's value is the mean of its seeds' readings on that draw's images, a seed whose reading
  is not finite on them (its resampled curve no longer reaches the target) left out of that draw.

The interval is the percentile interval of the draws (:func:`over_seeds`). Where every image of a seed
agrees (no within-seed spread) the draws reduce to a bootstrap over the training seeds alone; the more the
images vary, the wider the interval gets than that one-level one.

With fewer than :data:`MIN_SEEDS` training seeds no interval is given (over two seeds the percentile
"interval" is their range): the report prints the seeds' own values (:func:`~.h3_lines.seeds_text`). Beside the
interval, Student's t over the per-seed values (:func:`~pti_plugin.metrics.replication.student_interval`),
the small-sample check, from two seeds.

H1's excess over the null and its ``images_shared`` figures are read on the same draws (:mod:`.null_excess`,
:mod:`.h1_summary`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..metrics.replication import student_interval

#: The fewest training seeds an interval over seeds is given for.
MIN_SEEDS = 3
#: A paired difference smaller than this is exactly 0 (the same images read on both sides).
ZERO = 1e-12


def quiet_nanmean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """``np.nanmean`` without the warning for an all-NaN slice (which stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(values, axis=axis)


@dataclass(frozen=True)
class ImageDraws:
    """``index``: ``[draws, images]`` resampled sampling-seed indices, one row per draw, shared by every
    reading of one summary."""

    index: np.ndarray

    @classmethod
    def make(cls, images: int, draws: int, seed: int = 0) -> ImageDraws:
        if int(draws) < 1 or int(images) < 1:
            raise ValueError(f"need at least one draw and one image, got {draws} and {images}")
        return cls(np.random.default_rng(seed).integers(0, int(images), (int(draws), int(images))))

    @property
    def width(self) -> int:
        return self.index.shape[1]

    @property
    def draws(self) -> int:
        return self.index.shape[0]

    def means(self, values: np.ndarray) -> np.ndarray:
        """``values`` ``[..., images]`` (NaN: no value) -> ``[..., draws]``: the mean over each draw's images."""
        return quiet_nanmean(np.asarray(values, dtype=np.float64)[..., self.index], axis=-1)


@dataclass(frozen=True)
class PerSeed:
    """One reading per training seed: ``estimate`` ``[seeds]`` from all images and ``draws``
    ``[seeds, draws]`` on each draw's images (NaN: no reading)."""

    seeds: tuple[int, ...]
    estimate: np.ndarray
    draws: np.ndarray

    @classmethod
    def without_images(cls, values: dict[int, float], draws: int) -> PerSeed:
        """Per-seed values whose images are not at hand: every draw repeats the value (no within-seed spread)."""
        estimate = np.array([values[s] for s in values], dtype=np.float64)
        return cls(tuple(values), estimate, np.repeat(estimate[:, None], int(draws), axis=1))

    def minus(self, other: PerSeed) -> PerSeed:
        """The paired difference on the seeds both have (in this reading's order)."""
        shared = [s for s in self.seeds if s in other.seeds]
        mine, theirs = [self.seeds.index(s) for s in shared], [other.seeds.index(s) for s in shared]
        return PerSeed(tuple(shared), self.estimate[mine] - other.estimate[theirs],
                       self.draws[mine] - other.draws[theirs])

    def minus_null(self, estimate: float, draws: np.ndarray) -> PerSeed:
        """Each seed's reading minus the null's (``estimate``; ``draws`` ``[draws]`` on the same images)."""
        return PerSeed(self.seeds, self.estimate - estimate, self.draws - np.asarray(draws)[None, :])

    def finite(self) -> dict[int, float]:
        return {s: float(v) for s, v in zip(self.seeds, self.estimate) if np.isfinite(v)}


def over_seeds(reading: PerSeed, min_seeds: int = MIN_SEEDS, level: float = 0.95, seed: int = 0) -> dict | None:
    """The mean of ``reading`` over the seeds with a finite value, with ``n_seeds``, ``per_seed`` (the
    values), the two-level percentile interval (``lo``/``hi``: None with fewer than ``min_seeds`` seeds) and
    ``student``, Student's t over the per-seed values (None with fewer than two); None without a finite value."""
    keep = np.isfinite(reading.estimate)
    if not keep.any():
        return None
    values, replicates = reading.estimate[keep], reading.draws[keep]  # [k], [k, draws]
    k = values.size
    out = {"estimate": float(values.mean()), "lo": None, "hi": None, "n_seeds": int(k),
           "per_seed": {str(s): float(v) for s, v in zip(np.asarray(reading.seeds)[keep], values)},
           "student": student_interval(values, level).to_dict() if k >= 2 else None}
    if k >= min_seeds:
        draws = replicates.shape[1]
        picked = np.random.default_rng(seed).integers(0, k, (draws, k))
        means = quiet_nanmean(replicates[picked, np.arange(draws)[:, None]], axis=1)
        means = means[np.isfinite(means)]
        if means.size:
            tail = (1.0 - level) / 2.0
            out["lo"], out["hi"] = (float(q) for q in np.quantile(means, [tail, 1.0 - tail]))
    return out


def paired(values: PerSeed, reference: PerSeed, below: dict[int, bool] | None = None) -> dict | None:
    """:func:`over_seeds` of ``values - reference`` on the seeds where both are finite, with ``n_paired``,
    ``zero_differences`` (pairs exactly equal) and ``below_first_rate`` (pairs where ``below[seed]``: a side's
    reading falls below its first trained rate)."""
    difference = values.minus(reference)
    out = over_seeds(difference)
    if out is None:
        return None
    pairs = [int(s) for s in out["per_seed"]]
    return out | {"n_paired": out["n_seeds"],
                  "zero_differences": sum(abs(v) < ZERO for v in out["per_seed"].values()),
                  "below_first_rate": sum(bool((below or {}).get(s)) for s in pairs)}


def has_interval(entry: dict | None) -> bool:
    """Whether ``entry`` (an :func:`over_seeds` dict, or an interval) carries a 95% interval."""
    return bool(entry) and entry.get("lo") is not None and entry.get("hi") is not None
