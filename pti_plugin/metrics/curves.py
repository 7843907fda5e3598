"""Shapes of replicated curves: knees, breakpoints, half-way times, values at matched x.

A curve is ``x`` [points] with ``y`` [training_seeds, points] (one row per run; NaN for a missing
point), or a single 1-D curve. Intervals over training seeds come from
:mod:`pti_plugin.metrics.replication`; the knee itself is :func:`pti_plugin.metrics.knee.knee_index`.

- :func:`knee_with_interval` — knee of the mean curve, and a bootstrap interval over runs;
- :func:`segment_fits` — one straight line against two joined segments, by AIC and BIC;
- :func:`half_way_step` — when a training metric has gone half its way to its plateau;
- :func:`crossing_time_ratio` — how much later one metric gets half-way than another, per run;
- :func:`value_at_matched` — one metric read off where another reaches given targets;
- :func:`value_at_first_crossing` — the same along a sweep's own order, where x first rises to each target;
- :func:`share_decreases` — steps where a share (a fraction of n images) falls by more than its sampling noise;
- :func:`first_crossing` — where a curve first reaches a level (e.g. where a share reaches 0.5).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from pti_plugin.metrics.knee import knee_index
from pti_plugin.metrics.replication import Interval, seed_level_interval

# Breakpoints tried between two neighbouring interior points of a two-segment fit.
_BREAKPOINTS_PER_GAP = 20


def _curves(x: Sequence[float], y_per_seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y_per_seed, dtype=np.float64)
    if y.ndim == 1:
        y = y[None, :]
    if x.ndim != 1 or y.ndim != 2 or y.shape[1] != x.size:
        raise ValueError(f"need x [points] and y [training_seeds, points], got {x.shape} and {y.shape}")
    return x, y


def _knee_x(x: np.ndarray, y: np.ndarray, log_x: bool) -> float | None:
    index = knee_index(x.tolist(), y.tolist(), log_x=log_x)
    return None if index is None else float(x[index])


def knee_with_interval(x: Sequence[float], y_per_seed: np.ndarray, log_x: bool = False, draws: int = 2000,
                       level: float = 0.95, seed: int = 0) -> dict:
    """Knee (an x value) of the mean curve over training seeds, with a bootstrap interval over seeds.

    ``y_per_seed`` is ``[training_seeds, points]`` (a 1-D curve counts as one seed); the mean curve
    ignores NaN. Each resample draws training seeds with replacement and takes the knee x of its mean
    curve; resamples without a knee are left out of the interval and counted in ``no_knee_fraction``.
    Returns ``{"knee_x": float | None, "interval": Interval | None, "no_knee_fraction": float,
    "n_seeds": int}``; ``interval`` is None when no resample has a knee (its estimate is nan when
    only the mean curve has none). Knee positions are points of ``x``, so the bounds are too.
    """
    x, y = _curves(x, y_per_seed)
    if not 0.0 < level < 1.0 or int(draws) < 1:
        raise ValueError(f"need draws >= 1 and 0 < level < 1, got {draws} and {level}")
    with warnings.catch_warnings():  # an all-NaN column is simply NaN in the mean curve
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean_curve = np.nanmean(y, axis=0)
        rng = np.random.default_rng(seed)
        resampled = y[rng.integers(0, y.shape[0], size=(int(draws), y.shape[0]))]  # [draws, seeds, points]
        resampled_means = np.nanmean(resampled, axis=1)
    knee_x = _knee_x(x, mean_curve, log_x)
    knees = [_knee_x(x, curve, log_x) for curve in resampled_means]
    found = np.array([k for k in knees if k is not None], dtype=np.float64)
    interval = None
    if found.size:
        tail = (1.0 - level) / 2.0
        lo, hi = np.quantile(found, [tail, 1.0 - tail])
        interval = Interval(float("nan") if knee_x is None else knee_x, float(lo), float(hi))
    return {"knee_x": knee_x, "interval": interval, "no_knee_fraction": 1.0 - found.size / len(knees),
            "n_seeds": int(y.shape[0])}


def _information(sse: float, n: int, parameters: int, sse_floor: float) -> tuple[float, float]:
    """(AIC, BIC) of a least-squares fit with Gaussian errors, up to a constant shared by all fits."""
    fit = n * math.log(max(sse, sse_floor) / n)
    return fit + 2 * parameters, fit + parameters * math.log(n)


def _least_squares(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coefficients
    return coefficients, float(residual @ residual)


def _candidate_breakpoints(t: np.ndarray) -> np.ndarray:
    """Interior positions from the second to the second-to-last distinct point, on a fine grid."""
    interior = np.unique(t)[1:-1]
    fractions = np.arange(_BREAKPOINTS_PER_GAP) / _BREAKPOINTS_PER_GAP
    grid = [left + fractions * (right - left) for left, right in zip(interior[:-1], interior[1:])]
    return np.unique(np.concatenate(grid + [interior]))


def _best_breakpoint(t: np.ndarray, y: np.ndarray) -> float:
    """The candidate breakpoint whose hinge ``max(t - t0, 0)`` most reduces the straight line's SSE.

    Adding one column h to the line's design lowers the SSE by (h'r)^2 / (h'h) once h and y are
    taken orthogonal to the line's columns (r: the line's residual); all candidates at once.
    """
    candidates = _candidate_breakpoints(t)
    line_basis, _ = np.linalg.qr(np.column_stack([np.ones(t.size), t]))
    hinges = np.maximum(t[None, :] - candidates[:, None], 0.0)  # [candidates, n]
    hinges -= (hinges @ line_basis) @ line_basis.T
    residual = y - line_basis @ (line_basis.T @ y)
    norms = (hinges * hinges).sum(axis=1)
    norms[norms <= 1e-12 * norms.max()] = np.inf  # a hinge the line already spans gains nothing
    gain = (hinges @ residual) ** 2 / norms
    return float(candidates[int(np.argmax(gain))])


def segment_fits(x: Sequence[float], y: Sequence[float], log_x: bool = False) -> dict:
    """One straight line against two joined straight segments, fitted by least squares to a 1-D curve.

    The two-segment fit is continuous, ``y = a + b t + c max(t - t0, 0)`` with ``t`` = x (or log10 x
    with ``log_x``); the breakpoint ``t0`` is searched over the interior points (second to
    second-to-last) and a grid of ``_BREAKPOINTS_PER_GAP`` steps between them, so each segment has at
    least two points. AIC = n log(SSE/n) + 2k and BIC = n log(SSE/n) + k log n (Gaussian errors,
    shared constants dropped) with k = 2 for the line and 4 (incl. the breakpoint) for two segments;
    SSE below a numerical zero (1e-20 of the summed squares of y about its mean) counts as that zero.
    Non-finite points (and x <= 0 with ``log_x``) are ignored. Returns ``{"n_points", "one_segment":
    {"intercept", "slope", "sse", "aic", "bic"}, "two_segments": {"breakpoint_x", "slope_before",
    "slope_after", "sse", "aic", "bic"} | None, "prefers_two_segments"}``; slopes are per unit of
    ``t``. Two segments need 5 points; with fewer, ``two_segments`` is None.

    The searched breakpoint fits noise: on straight lines with Gaussian noise BIC still preferred two
    segments in about 40% of simulated 7-9 point curves, 29% at 11 points and 13% at 21.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(f"segment_fits needs 1-D x and y of one length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) if log_x else True)
    t, y = (np.log10(x[keep]) if log_x else x[keep]), y[keep]
    n = int(t.size)
    if n < 3 or np.ptp(t) == 0:
        raise ValueError(f"segment_fits needs at least 3 usable points at 2 distinct x, got {n}")
    sse_floor = max(1e-20 * float(((y - y.mean()) ** 2).sum()), np.finfo(np.float64).tiny)
    (intercept, slope), sse_line = _least_squares(np.column_stack([np.ones(n), t]), y)
    aic, bic = _information(sse_line, n, 2, sse_floor)
    result = {"n_points": n, "one_segment": {"intercept": float(intercept), "slope": float(slope), "sse": sse_line,
                                             "aic": aic, "bic": bic},
              "two_segments": None, "prefers_two_segments": False}
    if n < 5 or np.unique(t).size < 4:
        return result
    t0 = _best_breakpoint(t, y)
    (_, before, change), sse = _least_squares(np.column_stack([np.ones(n), t, np.maximum(t - t0, 0.0)]), y)
    aic2, bic2 = _information(sse, n, 4, sse_floor)
    result["two_segments"] = {"breakpoint_x": float(10.0 ** t0 if log_x else t0), "slope_before": float(before),
                              "slope_after": float(before + change), "sse": sse, "aic": aic2, "bic": bic2}
    result["prefers_two_segments"] = bool(bic2 < bic)
    return result


def half_way_step(steps: Sequence[float], values: Sequence[float], base: float | None = None,
                  plateau_points: int = 3) -> float | None:
    """First step at which a metric has gone half its way from ``base`` to its plateau.

    ``steps`` and ``values`` are 1-D, one value per checkpoint (sorted by step here; NaN points
    dropped). ``base`` defaults to the value at the first step; the plateau is the mean of the last
    ``plateau_points`` values. The crossing is linearly interpolated between the two checkpoints
    around it, for rising and falling metrics alike; a first checkpoint already past half-way gives
    the first step. None when the metric never moves (|plateau - base| within 1e-9 of the values'
    scale) or never crosses.
    """
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if steps.ndim != 1 or values.shape != steps.shape:
        raise ValueError(f"need 1-D steps and values of one length, got {steps.shape} and {values.shape}")
    keep = np.isfinite(steps) & np.isfinite(values)
    order = np.argsort(steps[keep], kind="stable")
    steps, values = steps[keep][order], values[keep][order]
    if values.size < 2 or plateau_points < 1:
        return None
    start = float(values[0]) if base is None else float(base)
    plateau = float(values[-plateau_points:].mean())
    scale = max(float(np.abs(values).max()), abs(start), 1e-300)
    if abs(plateau - start) <= 1e-9 * scale:
        return None
    direction = math.copysign(1.0, plateau - start)
    progress = (values - start) * direction  # distance travelled towards the plateau
    return first_crossing(steps, progress, abs(plateau - start) / 2.0)


def crossing_time_ratio(steps: Sequence[float], first_per_seed: np.ndarray, second_per_seed: np.ndarray,
                        draws: int = 2000, level: float = 0.95, seed: int = 0, plateau_points: int = 3) -> dict:
    """How many times later the second metric gets half-way than the first, per training seed.

    ``first_per_seed`` and ``second_per_seed`` are ``[training_seeds, checkpoints]`` on the shared
    ``steps``. Per seed, T_first and T_second are :func:`half_way_step` times and the ratio is
    T_second / T_first. Seeds where either time is None or not positive are listed in ``excluded``
    and left out. ``geometric_mean_ratio`` is exp of the mean log ratio with a bootstrap interval over
    seeds (:func:`seed_level_interval` on the log ratios, exponentiated), None without a usable seed.
    Returns ``{"first_times", "second_times", "ratios", "excluded", "geometric_mean_ratio"}`` (lists
    per seed, None where undefined).
    """
    steps = np.asarray(steps, dtype=np.float64)
    _, first = _curves(steps, first_per_seed)
    _, second = _curves(steps, second_per_seed)
    if first.shape != second.shape:
        raise ValueError(f"both metrics need the same seeds and checkpoints, got {first.shape} and {second.shape}")
    first_times = [half_way_step(steps, row, plateau_points=plateau_points) for row in first]
    second_times = [half_way_step(steps, row, plateau_points=plateau_points) for row in second]
    ratios: list[float | None] = []
    for t1, t2 in zip(first_times, second_times):
        usable = t1 is not None and t2 is not None and t1 > 0 and t2 > 0
        ratios.append(t2 / t1 if usable else None)
    excluded = [k for k, r in enumerate(ratios) if r is None]
    log_ratios = np.log([r for r in ratios if r is not None])
    geometric = None
    if log_ratios.size:
        on_log = seed_level_interval(log_ratios, draws=draws, level=level, seed=seed)
        geometric = Interval(math.exp(on_log.estimate), math.exp(on_log.lo), math.exp(on_log.hi))
    return {"first_times": first_times, "second_times": second_times, "ratios": ratios, "excluded": excluded,
            "geometric_mean_ratio": geometric}


def _per_seed_arrays(x_per_seed, y_per_seed, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x and y as float64 ``[training_seeds, points]`` (same shape, checked), targets 1-D, and the NaN
    output ``[training_seeds, len(targets)]`` of the matched-value readers."""
    x = np.atleast_2d(np.asarray(x_per_seed, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y_per_seed, dtype=np.float64))
    if x.shape != y.shape:
        raise ValueError(f"x and y need the same shape, got {x.shape} and {y.shape}")
    targets = np.asarray(targets, dtype=np.float64).reshape(-1)
    return x, y, targets, np.full((x.shape[0], targets.size), np.nan)


def value_at_matched(x_per_seed: np.ndarray, y_per_seed: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """``[training_seeds, len(targets)]``: per seed, y linearly interpolated where x equals each target.

    ``x_per_seed`` and ``y_per_seed`` are ``[training_seeds, points]`` (e.g. reconstruction and leakage
    along each run's learning-rate sweep). Each seed's finite (x, y) pairs are sorted by x, y is
    averaged over points sharing an x, and a target outside that seed's x range gives NaN.
    """
    x, y, targets, out = _per_seed_arrays(x_per_seed, y_per_seed, targets)
    for k in range(x.shape[0]):
        keep = np.isfinite(x[k]) & np.isfinite(y[k])
        if not keep.any():
            continue
        xs, inverse = np.unique(x[k][keep], return_inverse=True)
        ys = np.bincount(inverse, weights=y[k][keep]) / np.bincount(inverse)
        inside = (targets >= xs[0]) & (targets <= xs[-1])
        out[k, inside] = np.interp(targets[inside], xs, ys)
    return out


def value_at_first_crossing(x_per_seed: np.ndarray, y_per_seed: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """``[training_seeds, len(targets)]``: per seed, y where x *first* rises to each target along the sweep's
    own order (columns in sweep order, e.g. ascending learning rate), interpolated linearly on that segment.

    For a sweep whose x is not monotone (reconstruction that saturates, then dips), this reads the cost
    paid on the way to the target, not at a later point that happens to share its x. A seed whose first
    finite x already lies above a target, or that never reaches it, gives NaN; NaN points are skipped.
    """
    x, y, targets, out = _per_seed_arrays(x_per_seed, y_per_seed, targets)
    for k in range(x.shape[0]):
        keep = np.isfinite(x[k]) & np.isfinite(y[k])
        xs, ys = x[k][keep], y[k][keep]
        for j, target in enumerate(targets):
            if xs.size and xs[0] == target:
                out[k, j] = ys[0]
                continue
            for i in range(1, xs.size):
                if xs[i - 1] < target <= xs[i]:
                    w = (target - xs[i - 1]) / (xs[i] - xs[i - 1])
                    out[k, j] = ys[i - 1] + w * (ys[i] - ys[i - 1])
                    break
    return out


def share_decreases(shares: Sequence[float], n: int, z: float = 2.0) -> list[int]:
    """Indices ``k`` of the steps ``k -> k + 1`` along which a share falls by more than ``z`` binomial
    standard errors: ``shares[k] - shares[k + 1] > z * sqrt(p (1 - p) / n)`` with ``p`` the mean of the
    two shares (the sampling noise of one share at their level).

    ``shares`` is 1-D (fractions of ``n`` images each, in path order); NaN steps are never counted. A
    share that stays at 0 or 1 has no noise and cannot fall; a monotone rising curve gives ``[]``.
    """
    values = np.asarray(shares, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"shares must be 1-D, got shape {values.shape}")
    if int(n) < 1 or z < 0:
        raise ValueError(f"need n >= 1 images per share and z >= 0, got n={n}, z={z}")
    level = (values[:-1] + values[1:]) / 2.0
    tolerance = z * np.sqrt(np.clip(level * (1.0 - level), 0.0, None) / int(n))
    with np.errstate(invalid="ignore"):
        falls = (values[:-1] - values[1:]) > tolerance
    return [int(k) for k in np.flatnonzero(falls)]


def first_crossing(x: Sequence[float], y: Sequence[float], level: float = 0.5) -> float | None:
    """The first ``x`` at which the curve ``y(x)`` reaches ``level`` from below, linearly interpolated
    between the two points around it; ``x[0]`` when ``y[0]`` is already at or above it; None when it
    never gets there. ``x`` and ``y`` are 1-D of one length, in path order (NaN points dropped)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"need 1-D x and y of one length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    reached = np.flatnonzero(y >= level)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(x[0])
    step = (level - y[i - 1]) / (y[i] - y[i - 1])
    return float(x[i - 1] + step * (x[i] - x[i - 1]))
