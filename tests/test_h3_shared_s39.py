"""H3's per-rate figures resample the sampling seeds once per draw for all training seeds: every cell draws image
``j`` from sampling seed ``j``, so training seeds whose pivots agree draw the same images, and resampling each
seed's images apart would count them as independent evidence."""

from __future__ import annotations

import numpy as np
import pytest

from pti_plugin.metrics.replication import two_level_bootstrap
from pti_plugin.protocol.h3_intervals import ImageDraws
from pti_plugin.protocol.h3_summary import LOST_THE_LOOK, highest_safe_lr, lr_rows
from pti_plugin.protocol.null_excess import null_reading

SEEDS = (1, 2, 42)
IMAGES = 64
DRAWS = 2000


def _cells(lr: float, coarse: list[np.ndarray], class_rows: list[np.ndarray] | None = None) -> list[dict]:
    """One cell per training seed with the given per-image coarse flags (and 16 class-prompt images)."""
    out = []
    for k, (seed, row) in enumerate(zip(SEEDS, coarse)):
        cell = {"lr": lr, "seed": seed, "coarse": row.astype(int).tolist(), "in_training_cell": [0, 1] * (IMAGES // 2)}
        if class_rows is not None:
            cell["drift_class"] = class_rows[k].astype(int).tolist()
        out.append(cell)
    return out


def _width(entry: dict) -> float:
    return entry["hi"] - entry["lo"]


def _own_images(rows: list[np.ndarray]) -> float:
    """The width when each training seed's images are resampled apart (what the rows read before)."""
    interval = two_level_bootstrap(np.vstack(rows).astype(float), DRAWS)
    return interval.hi - interval.lo


def test_a_rates_interval_resamples_the_sampling_seeds_the_training_seeds_share():
    """Identical seeds: as wide as one seed's images resampled (the other seeds add nothing), about sqrt(3) wider
    than the per-seed resample; independent seeds: about as wide as it (a little wider at most, a training seed
    drawn twice bringing the same images twice). A score on 16 of the sampling seeds (the class prompt's drift
    images) is resampled on draws of its own width."""
    rng = np.random.default_rng(11)
    alike, alike_class = rng.binomial(1, 0.5, IMAGES), rng.binomial(1, 0.5, 16)
    independent = [rng.binomial(1, 0.5, IMAGES) for _ in SEEDS]
    groups = {1e-4: _cells(1e-4, [alike] * 3, [alike_class] * 3), 1e-3: _cells(1e-3, independent)}
    same, apart = lr_rows(groups, None, ImageDraws.make(IMAGES, DRAWS), DRAWS)
    one_seed = two_level_bootstrap(alike[None, :].astype(float), DRAWS)
    assert same["coarse"]["estimate"] == pytest.approx(alike.mean())
    assert _width(same["coarse"]) == pytest.approx(one_seed.hi - one_seed.lo, rel=0.15)
    assert _width(same["coarse"]) > 1.4 * _own_images([alike] * 3)
    one_class_seed = two_level_bootstrap(alike_class[None, :].astype(float), DRAWS)
    assert same["drift_class"]["estimate"] == pytest.approx(alike_class.mean())
    assert _width(same["drift_class"]) == pytest.approx(one_class_seed.hi - one_class_seed.lo, rel=0.15)
    assert apart["coarse"]["estimate"] == pytest.approx(np.mean(independent))
    assert 0.9 < _width(apart["coarse"]) / _own_images(independent) < 1.5


def test_the_lost_the_look_stop_reads_the_shared_interval():
    """The pivot alone draws the character in 40 of 64 images, lr 1e-4 in all, lr 1e-3 in 45, the same images in
    every training seed: one seed's evidence, whose interval (about 0.70 +- 0.11) reaches the pivot's 0.625, so the
    search stops at 1e-3 for a lost look; three seeds' images resampled apart (+- 0.065) would not reach it."""
    pivot, later = np.zeros(IMAGES, int), np.zeros(IMAGES, int)
    pivot[:40], later[:45] = 1, 1
    groups = {0.0: _cells(0.0, [pivot] * 3), 1e-4: _cells(1e-4, [np.ones(IMAGES, int)] * 3),
              1e-3: _cells(1e-3, [later] * 3)}
    images = ImageDraws.make(IMAGES, DRAWS)
    null = null_reading(np.array([[0, 1] * (IMAGES // 2)], dtype=float), images)  # the cells' leakage: excess 0
    rows = lr_rows(groups, null, images, DRAWS)
    assert all(row["inside_null"] for row in rows)
    assert two_level_bootstrap(np.vstack([later] * 3).astype(float), DRAWS).lo > pivot.mean()  # the old reading
    assert rows[2]["coarse"]["lo"] <= pivot.mean()
    assert highest_safe_lr(rows)["lr"] == 1e-4
    assert highest_safe_lr(rows)["stopped_at"] == {"lr": 1e-3, "reason": LOST_THE_LOOK}
