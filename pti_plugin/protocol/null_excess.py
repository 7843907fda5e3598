"""A cell's share of images in a training cell minus the null's, paired image by image.

H1's null is the base model with the init word; its set ``a`` draws image ``j`` from sampling seed ``j`` with
the same neutral prompt as every H1 and H3 cell (:func:`~.premise.sample`, :func:`~.premise.neutral_prompts`),
so a cell and the null agree or differ image by image, not as independent samples. The excess over the null
(:func:`paired_excess`) is, per training seed, its mean minus the null's on the same sampling seeds, and its
interval is two-level with the sampling seeds crossed (:mod:`.h3_intervals`): one resample of the image
indices per draw (:class:`~.h3_intervals.ImageDraws`), the same for the cell's seeds and for the null, and the
training seeds resampled over it. What an image brings to both sides (an image whose layout lands in a
training cell whatever the token) then cancels; where the cell and the null are independent, the interval is
about as wide as two sides bootstrapped apart (:func:`~pti_plugin.metrics.replication.excess_over_null`; a
little wider, since a training seed drawn twice in a draw brings the same images twice). H1's rows
(:mod:`.h1_summary`) and H3's (:mod:`.h3_summary`) both read it from here; :func:`on_shared_images` is the
per-seed reading it starts from. A rate's own figures (a score's mean over its training seeds) get their interval
the same way (:func:`over_shared_images`): the sampling seeds resampled once per draw for all training seeds,
since the seeds draw image ``j`` from the same sampling seed and, where their pivots are alike, nearly the same
image; resampling each seed's images apart would treat those as independent and give too narrow an interval.
"""

from __future__ import annotations

import numpy as np

from .h3_intervals import ImageDraws, PerSeed, over_seeds, quiet_nanmean


def image_count(cells: list[dict], null_a: np.ndarray | None = None) -> int:
    """The most images any of ``cells`` (or the null's row) has: the width of :class:`~.h3_intervals.ImageDraws`."""
    widths = [len(c["in_training_cell"]) for c in cells] + ([] if null_a is None else [null_a.shape[1]])
    return max(widths, default=1)


def fitted(values: np.ndarray, width: int) -> np.ndarray:
    """``values`` ``[..., images]`` cut or NaN-padded to ``width`` images (image ``j``: sampling seed ``j``)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape[:-1] + (int(width),), np.nan)
    keep = min(int(width), values.shape[-1])
    out[..., :keep] = values[..., :keep]
    return out


def null_reading(null_a: np.ndarray | None, images: ImageDraws) -> tuple[float, np.ndarray] | None:
    """The null's training-cell fraction (set ``a``, ``[1, images]``) and its mean on each draw's images."""
    if null_a is None:
        return None
    return float(quiet_nanmean(null_a[0])), images.means(fitted(null_a[0], images.width))


def on_shared_images(seeds: tuple[int, ...], values: np.ndarray, images: ImageDraws) -> PerSeed:
    """Each training seed's mean of ``values`` (``[training seeds, images]``, row ``k`` training seed ``seeds[k]``,
    image ``j`` sampling seed ``j``; NaN: no value), from all its images and on each draw's ``images``."""
    return PerSeed(tuple(seeds), quiet_nanmean(values), images.means(fitted(values, images.width)))


def over_shared_images(seeds: tuple[int, ...], values: np.ndarray, images: ImageDraws) -> dict | None:
    """``values``' mean over training seeds (as :func:`on_shared_images`) with its two-level interval: each draw
    resamples the sampling seeds once for every training seed (``images``) and the training seeds over them,
    from any number of seeds (:func:`~.h3_intervals.over_seeds`). A score read on a fixed subset of the
    sampling seeds (fewer columns than ``images.width``, the same subset in the same order for every training
    seed: one prompt's drift images) is resampled on draws of its own width."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] != images.width:
        images = ImageDraws.make(values.shape[-1], images.draws)
    return over_seeds(on_shared_images(seeds, values, images), min_seeds=1)


def paired_excess(seeds: tuple[int, ...], values: np.ndarray, null: tuple[float, np.ndarray],
                  images: ImageDraws) -> dict | None:
    """``values`` (as :func:`on_shared_images`) minus the null (:func:`null_reading` on the same ``images``), per
    training seed on the same sampling seeds: :func:`~.h3_intervals.over_seeds` from any number of seeds (as a
    row's other scores)."""
    return over_seeds(on_shared_images(seeds, values, images).minus_null(*null), min_seeds=1)
