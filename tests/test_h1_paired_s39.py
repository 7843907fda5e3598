"""H1's training-cell excess over the null is paired image by image: every cell and the null's set ``a`` draw
image ``j`` from sampling seed ``j``, so the excess resamples the sampling seeds once for both sides."""

from __future__ import annotations

import numpy as np
import pytest

from pti_plugin.metrics.replication import excess_over_null, two_level_bootstrap
from pti_plugin.protocol.h1_summary import summarise_h1

SEEDS = (1, 2, 42)
IMAGES = 64


def _cells(flags: dict[float, list[np.ndarray]]) -> list[dict]:
    """One cell per (rate, seed) with the given per-image training-cell flags; the other scores constant."""
    out = []
    for k, (lr, rows) in enumerate(flags.items()):
        for seed, row in zip(SEEDS, rows):
            ones = [1] * IMAGES
            out.append({"lr": lr, "seed": seed, "vectors": 1, "steps": 1000, "coarse": ones, "detail": [0] * IMAGES,
                        "appearance_error": [0.15] * IMAGES, "joint_edit": ones, "edit": ones,
                        "joint_background_edit": ones, "in_training_cell": row.astype(int).tolist(),
                        "has_object": ones, "movement": {"pivot_l2_from_init": 0.1 * (k + 1),
                                                         "pivot_angle_from_init_deg": 5.0 * (k + 1),
                                                         "output_angle_layernorm_deg": 5.0 * (k + 1)}})
    return out


def _null(a: np.ndarray, rng: np.random.Generator) -> dict:
    return {"a": {"in_training_cell": a.astype(int).tolist()},
            "b": {"in_training_cell": rng.binomial(1, 1 / 3, IMAGES).tolist()}}


def _unpaired(rows: list[np.ndarray], a: np.ndarray) -> tuple[float, float]:
    """The excess bootstrapped on each side apart (the null as if its images were independent of the cells')."""
    interval = excess_over_null(np.vstack(rows).astype(float), a[None, :].astype(float), draws=2000)
    return interval.lo, interval.hi


def test_the_excess_over_the_null_is_paired_image_by_image():
    """Narrower than unpaired where the cells agree with the null image by image (exactly 0 where they are the
    null's images), about as wide where they are independent of it."""
    rng = np.random.default_rng(3)
    a = rng.binomial(1, 1 / 3, IMAGES)
    moved = a.copy()
    moved[np.flatnonzero(a == 0)[:4]] = 1  # four images the null leaves out of the training cells land in one
    independent = [rng.binomial(1, 1 / 3, IMAGES) for _ in SEEDS]  # nothing shared with the null or between seeds
    summary = summarise_h1(_null(a, rng), _cells({1e-4: [a] * 3, 1e-3: [moved] * 3, 1e-2: independent}), draws=2000)
    same, more, apart = (row["training_cell_excess"] for row in summary["rows"])
    # the same images on both sides: every draw's excess is exactly 0, where unpaired the null's own spread shows
    assert (same["estimate"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    lo, hi = _unpaired([a] * 3, a)
    assert lo < -0.05 and hi > 0.05
    # four images added in every seed: each seed's excess is 4/64, and no draw can go below 0
    assert more["per_seed"] == {str(s): pytest.approx(4 / IMAGES) for s in SEEDS}
    assert more["estimate"] == pytest.approx(4 / IMAGES) and more["lo"] >= 0.0
    lo, hi = _unpaired([moved] * 3, a)
    assert lo < 0.0 and (more["hi"] - more["lo"]) < 0.6 * (hi - lo)
    # independent of the null: about as wide as unpaired (a little wider at most: a training seed drawn twice
    # brings the same images twice, where unpaired it draws them afresh)
    assert apart["estimate"] == pytest.approx(np.mean(np.vstack(independent)) - a.mean())
    lo, hi = _unpaired(independent, a)
    assert 0.9 < (apart["hi"] - apart["lo"]) / (hi - lo) < 1.25


def test_a_rates_figures_are_also_given_with_the_sampling_seeds_resampled_once_for_all_training_seeds():
    """``images_shared``: wider than the per-seed resample where the seeds draw the same images (as wide as one
    seed's images resampled: the other seeds add nothing), about as wide where they draw independent ones (a
    little wider: a training seed drawn twice brings the same images twice, which with 3 seeds widens the images'
    part by sqrt(5/3) at most)."""
    rng = np.random.default_rng(5)
    a = rng.binomial(1, 1 / 3, IMAGES)
    alike = rng.binomial(1, 0.5, IMAGES)
    independent = [rng.binomial(1, 0.5, IMAGES) for _ in SEEDS]
    summary = summarise_h1(_null(a, rng), _cells({1e-4: [alike] * 3, 1e-3: independent}), draws=2000)
    same, apart = summary["rows"]
    shared, own = same["images_shared"]["in_training_cell"], same["in_training_cell"]
    assert shared["estimate"] == pytest.approx(alike.mean()) == pytest.approx(own["estimate"])
    one_seed = two_level_bootstrap(alike[None, :].astype(float), draws=2000)
    assert shared["hi"] - shared["lo"] == pytest.approx(one_seed.hi - one_seed.lo, rel=0.15)
    assert shared["hi"] - shared["lo"] > 1.4 * (own["hi"] - own["lo"])  # sqrt(3) in expectation
    shared, own = apart["images_shared"]["in_training_cell"], apart["in_training_cell"]
    assert 0.9 < (shared["hi"] - shared["lo"]) / (own["hi"] - own["lo"]) < 1.5
    constant = same["images_shared"]["appearance_error"]  # every image the same: no spread at either level
    assert (constant["lo"], constant["hi"]) == (pytest.approx(0.15), pytest.approx(0.15))
