"""H1's statistics over the cells of :mod:`.h1_inversion`: intervals, the knee, the segment fits, the verdict.

Every figure is a mean over training seeds of per-seed means over sampling seeds, with a 95%
two-level bootstrap interval (:func:`~pti_plugin.metrics.replication.two_level_bootstrap`). The
null is the base model with the init word sampled twice with disjoint seed sets. The training-cell
fraction of a cell is reported as excess over the null's first set, which draws image ``j`` from
sampling seed ``j`` as every cell does: paired image by image, each training seed's mean minus the
null's on the same sampling seeds, with a two-level interval that resamples the training seeds and the
sampling seeds they share with the null (:func:`~.null_excess.paired_excess`). The two null sets share
no sampling seed: their difference is bootstrapped on each side apart.

A score's interval resamples each training seed's images apart, although the seeds share their sampling
seeds and, where their pivots are alike, draw nearly the same images: then it is too narrow. Beside it,
for :data:`SHARED_IMAGE_SCORES`, ``images_shared``: the same mean with an interval that resamples the
sampling seeds once for all training seeds, as the excess does (:func:`~.null_excess.over_shared_images`).

**The knee** (:func:`~pti_plugin.metrics.curves.knee_with_interval`, Kneedle's maximum distance to
the chord; rates from a collapse on, defined below, left out) of the per-seed coarse-reconstruction curves against the seed-mean output-space angle
of each learning rate (and against the token L2), with a bootstrap interval over training seeds. Kneedle
picks a point of the grid, so the knee's learning rate and the grid points on either side of it are
kept (:func:`knee_grid`): an interval of zero width says every resample picked the same grid point, not
that the knee is known more finely than the grid. The same curve is fitted with one line and with two
joined segments (:func:`~pti_plugin.metrics.curves.segment_fits`, BIC; stored to :data:`FIT_DIGITS`
significant digits, so that a rebuilt summary is byte-for-byte the committed one).

**Verdict.** H1 says reconstruction is gained and editability lost as the pivot moves away. The
rates from a *collapse* on (reconstruction falling below 0.9 of its best, past the best: the pivot
has left what the model can read, and reconstruction and editability fall together) are reported
but left out of the verdict. It is *supported* when the reconstruction curve has a knee (found in at
least 95% of resamples) and a joint editability (position edits, or the backgrounds the neutral
prompts ask for) at the farthest remaining pivot is below its best, with the paired difference's
interval below 0; *not supported* when the knee search ran (3 or more learning rates) and
finds no knee or that interval lies within +-0.1 (no loss worth the name); otherwise *inconclusive*.
"""

from __future__ import annotations

import numpy as np

from ..metrics.curves import knee_with_interval, segment_fits
from ..metrics.replication import (Interval, excess_over_null, paired_difference, same_lr, student_interval,
                                   two_level_bootstrap)
from .h3_intervals import ImageDraws
from .null_excess import image_count, null_reading, over_shared_images, paired_excess

#: Per-image scores summarised for each learning rate, with what they mean.
SCORES = {
    "coarse": "coarse reconstruction (the character's two colours in order on a disc)",
    "detail": "the character's private dot",
    "appearance_error": "graded appearance error (lower is better)",
    "joint_edit": "joint editability: the asked cell AND the character",
    "edit": "the asked cell, character or not",
    "joint_background_edit": "joint editability of the background 3 of the 4 neutral prompts ask for",
    "in_training_cell": "objects in a training cell (chance 1/3)",
}
#: A change of joint editability within this margin counts as none (the verdict's "not supported").
NO_LOSS_MARGIN = 0.1
#: A rate past the best reconstruction whose reconstruction falls below this share of the best has collapsed.
COLLAPSE_SHARE = 0.9
#: The joint editabilities the verdict reads (position edits; backgrounds asked in the neutral prompts).
EDIT_SCORES = ("joint_edit", "joint_background_edit")
MOVEMENT = ("pivot_l2_from_init", "pivot_angle_from_init_deg", "output_angle_layernorm_deg")
#: Scores also given with the sampling seeds resampled once for all training seeds (``images_shared``).
SHARED_IMAGE_SCORES = ("coarse", "in_training_cell", "appearance_error")
#: Significant digits the segment fits are stored with: far above the report's 3, far below the last digits
#: in which least squares differs between machines (about 1e-13 relative), so that a rebuilt summary is the same file.
FIT_DIGITS = 10


def float_array(values: list) -> np.ndarray:
    """``values`` as a float64 array, None as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def seed_matrix(cells: list[dict], key: str) -> np.ndarray:
    """``[training seeds, sampling seeds]`` of one score over ``cells`` (one per training seed; shorter rows NaN-padded)."""
    rows = [float_array(c[key]) for c in cells]
    width = max(len(r) for r in rows)
    return np.vstack([np.pad(r, (0, width - len(r)), constant_values=np.nan) for r in rows])


def group_cells(cells: list[dict], vectors: int = 1) -> dict[float, list[dict]]:
    """Cells with ``vectors`` vectors by learning rate (ascending), each list in seed order."""
    out: dict[float, list[dict]] = {}
    for cell in sorted(cells, key=lambda c: (c["lr"], c["seed"])):
        if cell["vectors"] == vectors:
            out.setdefault(cell["lr"], []).append(cell)
    return out


def null_summary(null: dict, draws: int = 2000) -> dict:
    """The base model against itself: each set's training-cell fraction and the difference of the sets."""
    a, b = (float_array(null[name]["in_training_cell"])[None, :] for name in ("a", "b"))
    return {"training_cells_a": two_level_bootstrap(a, draws).to_dict(),
            "training_cells_b": two_level_bootstrap(b, draws).to_dict(),
            "difference_b_minus_a": excess_over_null(b, a, draws).to_dict()}


def point_row(lr: float, cells: list[dict], null: tuple[float, np.ndarray] | None, images: ImageDraws,
              draws: int = 2000) -> dict:
    """One learning rate's figures: movement means (and per seed), every score's interval (and ``images_shared``),
    the leakage excess over the null (``null``: :func:`~.null_excess.null_reading` on ``images``; paired image by
    image)."""
    row: dict = {"lr": lr, "lr_x_steps": lr * cells[0]["steps"], "n_seeds": len(cells),
                 "seeds": [c["seed"] for c in cells]}
    for key in MOVEMENT:
        values = [c["movement"].get(key) for c in cells]
        row[key] = float(np.mean([v for v in values if v is not None])) if any(v is not None for v in values) else None
        row[f"{key}_per_seed"] = values
    for key in SCORES:
        row[key] = two_level_bootstrap(seed_matrix(cells, key), draws).to_dict()
    row["images_shared"] = {key: over_shared_images(tuple(row["seeds"]), seed_matrix(cells, key), images)
                            for key in SHARED_IMAGE_SCORES}
    if null is not None:
        row["training_cell_excess"] = paired_excess(tuple(row["seeds"]), seed_matrix(cells, "in_training_cell"),
                                                    null, images)
    return row


def per_seed_curves(groups: dict[float, list[dict]], key: str) -> np.ndarray:
    """``[training seeds, learning rates]``: each seed's mean of ``key`` at each rate (NaN where missing)."""
    seeds = sorted({c["seed"] for cells in groups.values() for c in cells})
    out = np.full((len(seeds), len(groups)), np.nan)
    for j, cells in enumerate(groups.values()):
        for c in cells:
            out[seeds.index(c["seed"]), j] = np.nanmean(float_array(c[key]))
    return out


def rounded(value, digits: int = FIT_DIGITS):
    """``value`` with every float (in dicts and lists too) rounded to ``digits`` significant digits."""
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def knee_grid(rows: list[dict], x: np.ndarray, knee_x: float | None) -> dict:
    """``knee_lr``, the learning rate of the grid point ``knee_x`` (``x[k]``: row k's position on the axis), and
    ``grid_neighbours``, the grid points just below and just above it along ``x`` (each ``{"lr", "x"}``, None past
    an end): Kneedle picks grid points, so the knee is placed no more finely than between these two."""
    if knee_x is None:
        return {"knee_lr": None, "grid_neighbours": [None, None]}
    order = [int(k) for k in np.argsort(x) if np.isfinite(x[k])]
    at = min(range(len(order)), key=lambda j: abs(x[order[j]] - knee_x))

    def point(j: int) -> dict | None:
        return {"lr": rows[order[j]].get("lr"), "x": float(x[order[j]])} if 0 <= j < len(order) else None

    return {"knee_lr": rows[order[at]].get("lr"), "grid_neighbours": [point(at - 1), point(at + 1)]}


def knee_and_fits(rows: list[dict], groups: dict[float, list[dict]], draws: int = 2000) -> dict:
    """Knee of coarse reconstruction against the output-space angle and token L2 (:func:`knee_grid` beside it),
    and segment fits."""
    out = {}
    coarse, joint_edit = per_seed_curves(groups, "coarse"), per_seed_curves(groups, "joint_edit")
    for axis in ("output_angle_layernorm_deg", "pivot_l2_from_init"):
        x = np.array([np.nan if r[axis] is None else r[axis] for r in rows])
        if np.isfinite(x).sum() < 3:
            continue
        knee = knee_with_interval(x, coarse, draws=draws)
        out[axis] = {"knee_x": knee["knee_x"], "interval": knee["interval"].to_dict() if knee["interval"] else None,
                     "no_knee_fraction": knee["no_knee_fraction"]} | knee_grid(rows, x, knee["knee_x"]) | {
                     "segments_coarse": rounded(segment_fits(x, np.nanmean(coarse, axis=0))),
                     "segments_joint_edit": rounded(segment_fits(x, np.nanmean(joint_edit, axis=0)))}
    return out


def collapse_index(rows: list[dict]) -> int | None:
    """Index of the first learning rate past the best coarse reconstruction whose reconstruction falls
    below :data:`COLLAPSE_SHARE` of that best (the pivot has left the region the model reads), or None."""
    coarse = [r["coarse"]["estimate"] for r in rows]
    best = int(np.nanargmax(coarse))
    return next((k for k in range(best + 1, len(rows)) if coarse[k] < COLLAPSE_SHARE * coarse[best]), None)


def _drop(groups: dict[float, list[dict]], key: str, far: float, best: float, draws: int) -> tuple[Interval, Interval | None]:
    """Paired (over shared training seeds and sampling seeds) ``key`` at rate ``far`` minus at rate ``best``:
    the two-level interval, and Student's t over the per-seed differences (the small-sample check; None
    with fewer than two seeds)."""
    shared = sorted({c["seed"] for c in groups[far]} & {c["seed"] for c in groups[best]})
    pick = lambda lr: seed_matrix([c for c in groups[lr] if c["seed"] in shared], key)  # noqa: E731
    far_values, best_values = pick(far), pick(best)  # [seeds, sampling seeds], rows in the same seed order
    per_seed = np.nanmean(far_values - best_values, axis=1)
    student = student_interval(per_seed) if np.isfinite(per_seed).sum() >= 2 else None
    return paired_difference(far_values, best_values, draws), student


def _verdict_word(knee: dict | None, has_knee: bool, intervals: list[dict]) -> str:
    """The module docstring's rule on the editability drops' ``intervals``."""
    if has_knee and any(i["hi"] < 0 for i in intervals):
        return "supported"
    if knee is not None and (not has_knee or all(-NO_LOSS_MARGIN <= i["lo"] and i["hi"] <= NO_LOSS_MARGIN
                                                 for i in intervals)):
        return "not supported"
    return "inconclusive"


def verdict(rows: list[dict], groups: dict[float, list[dict]], knees: dict, draws: int = 2000) -> dict:
    """The module docstring's rule, with the intervals that decide, on the rates before any collapse; and
    ``verdict_student``, the same rule on Student's t intervals (the small-sample check; None when a drop
    has fewer than two seeds)."""
    collapse = collapse_index(rows)
    kept = rows[:collapse] if collapse is not None else rows
    lrs = [r["lr"] for r in kept]
    drops = {}
    for key in EDIT_SCORES:
        best = lrs[int(np.nanargmax([r[key]["estimate"] for r in kept]))]
        interval, student = _drop(groups, key, lrs[-1], best, draws)
        drops[key] = {"best_lr": best, "farthest_lr": lrs[-1], "farthest_minus_best": interval.to_dict(),
                      "farthest_minus_best_student": None if student is None else student.to_dict()}
    knee = knees.get("output_angle_layernorm_deg")
    has_knee = knee is not None and knee["knee_x"] is not None and knee["no_knee_fraction"] <= 0.05
    students = [d["farthest_minus_best_student"] for d in drops.values()]
    return {"verdict": _verdict_word(knee, has_knee, [d["farthest_minus_best"] for d in drops.values()]),
            "verdict_student": None if None in students else _verdict_word(knee, has_knee, students),
            "knee_found": has_knee, "editability_drops": drops,
            "collapse_lr": None if collapse is None else rows[collapse]["lr"]}


def vector_rows(cells: list[dict], draws: int = 2000) -> list[dict]:
    """Coarse reconstruction and joint editability per (vectors, lr) at the rates where several vector counts ran
    (each in seed order, as :func:`group_cells`: the bootstrap's draws then do not depend on the cells' order)."""
    counts = sorted({c["vectors"] for c in cells})
    rates = sorted({c["lr"] for c in cells if c["vectors"] > 1})
    out = []
    for lr in rates:
        for n in counts:
            chosen = sorted((c for c in cells if c["vectors"] == n and same_lr(c["lr"], lr)), key=lambda c: c["seed"])
            if chosen:
                out.append({"vectors": n, "lr": lr, "n_seeds": len(chosen)}
                           | {k: two_level_bootstrap(seed_matrix(chosen, k), draws).to_dict()
                              for k in ("coarse", "joint_edit", "appearance_error")})
    return out


def summarise_h1(null: dict | None, cells: list[dict], draws: int = 2000) -> dict:
    """Everything above for the measured cells (a partial grid gives a partial summary)."""
    groups = group_cells(cells, 1)
    null_a = None if null is None else float_array(null["a"]["in_training_cell"])[None, :]
    images = ImageDraws.make(image_count(cells, null_a), draws)
    rows = [point_row(lr, members, null_reading(null_a, images), images, draws) for lr, members in groups.items()]
    kept = rows[:collapse_index(rows)] if rows else rows  # the knee, like the verdict, stops at a collapse
    knees = knee_and_fits(kept, {r["lr"]: groups[r["lr"]] for r in kept}, draws) if len(kept) >= 3 else {}
    return {"rows": rows, "null": null_summary(null, draws) if null else None, "knees": knees,
            "verdict": verdict(rows, groups, knees, draws) if len(rows) >= 2 else None,
            "vectors": vector_rows(cells, draws)}
