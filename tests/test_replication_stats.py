"""Statistics of replicated experiments (metrics.replication, metrics.curves) on simulated data with
known truths: interval coverage, pairing, knees and breakpoints, half-way times, matched values."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pti_plugin.metrics.curves import (crossing_time_ratio, half_way_step, knee_with_interval, segment_fits,
                                       value_at_matched)
from pti_plugin.metrics.replication import (Interval, excess_over_null, paired_difference, resampled_interval,
                                            seed_level_interval, student_interval, two_level_bootstrap)

TRUE_MEAN = 0.3


def hierarchical(rng: np.random.Generator, seeds: int = 5, samples: int = 64, seed_sd: float = 0.3,
                 noise_sd: float = 1.0) -> np.ndarray:
    """[seeds, samples]: TRUE_MEAN + a per-training-seed effect + independent per-image noise."""
    return TRUE_MEAN + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise_sd, (seeds, samples))


def image_level_interval(values: np.ndarray) -> tuple[float, float]:
    """Naive 95% normal interval that treats every image as independent (ignores the training-seed effect)."""
    flat = values.ravel()
    half_width = 1.96 * flat.std(ddof=1) / np.sqrt(flat.size)
    return float(flat.mean() - half_width), float(flat.mean() + half_width)


# --- replication ------------------------------------------------------------------------------------


def test_interval_excludes_and_to_dict():
    interval = Interval(1.0, 0.5, 2.0)
    assert not interval.excludes(0.5) and not interval.excludes(1.7)
    assert interval.excludes(0.49) and interval.excludes(2.01)
    assert interval.to_dict() == {"estimate": 1.0, "lo": 0.5, "hi": 2.0}


def test_two_level_interval_covers_true_mean_and_is_wider_than_image_level():
    rng = np.random.default_rng(0)
    covered = naive_covered = 0
    widths, naive_widths = [], []
    for d in range(200):
        data = hierarchical(rng)
        interval = two_level_bootstrap(data, draws=400, seed=d)
        covered += not interval.excludes(TRUE_MEAN)
        widths.append(interval.hi - interval.lo)
        lo, hi = image_level_interval(data)
        naive_covered += lo <= TRUE_MEAN <= hi
        naive_widths.append(hi - lo)
    # 5 training seeds: a percentile bootstrap falls somewhat short of 95% (module docstring).
    assert covered / 200 >= 0.80
    assert naive_covered / 200 < 0.75
    assert np.mean(naive_widths) < 0.6 * np.mean(widths)


@pytest.mark.parametrize("seeds", [3, 5])
def test_student_interval_keeps_its_level_with_few_seeds_where_the_percentile_bootstrap_falls_short(seeds):
    """Run-to-run spread dominating (the case the module docstring measures): over 1000 simulated experiments
    of `seeds` training seeds, Student's interval on the per-seed means covers the true mean 95% of the time
    (binomial sd 0.7%), the two-level percentile bootstrap clearly less."""
    rng = np.random.default_rng(seeds)
    student = bootstrap = 0
    for d in range(1000):
        data = hierarchical(rng, seeds=seeds, samples=16, seed_sd=1.0, noise_sd=0.5)
        student += not student_interval(data.mean(axis=1)).excludes(TRUE_MEAN)
        if d < 300:  # the bootstrap is the slow side
            bootstrap += not two_level_bootstrap(data, draws=300, seed=d).excludes(TRUE_MEAN)
    assert 0.93 <= student / 1000 <= 0.97
    assert bootstrap / 300 <= 0.88


def test_student_interval_drops_non_finite_values_and_needs_two():
    interval = student_interval(np.array([1.0, 2.0, 3.0, np.nan]))
    assert interval.estimate == 2.0
    assert interval.lo == pytest.approx(2.0 - 4.302653 / np.sqrt(3), abs=1e-5)  # t(2, 0.975) = 4.3027, s = 1
    assert student_interval(np.array([0.0, 0.0, 0.0])).to_dict() == {"estimate": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError, match="at least two finite"):
        student_interval(np.array([1.0, np.inf]))


def test_two_level_estimate_weighs_seeds_equally_and_ignores_missing():
    values = np.array([[1.0, np.nan, np.nan], [3.0, 5.0, np.nan], [np.nan] * 3])
    interval = two_level_bootstrap(values, draws=300)
    assert interval.estimate == pytest.approx((1.0 + 4.0) / 2)  # the all-NaN run is dropped
    assert 1.0 <= interval.lo <= interval.estimate <= interval.hi <= 5.0


def test_two_level_is_deterministic_in_seed_and_fast():
    data = hierarchical(np.random.default_rng(1))
    start = time.perf_counter()
    first = two_level_bootstrap(data, draws=2000, seed=7)
    assert time.perf_counter() - start < 1.0
    assert two_level_bootstrap(data, draws=2000, seed=7) == first
    assert two_level_bootstrap(data, draws=2000, seed=8) != first


def test_paired_difference_is_narrow_and_covers_true_difference():
    rng = np.random.default_rng(2)
    true_difference, covered, paired_widths, unpaired_widths = 0.1, 0, [], []
    for d in range(60):
        seed_effect = rng.normal(0, 0.5, (5, 1))
        image_effect = rng.normal(0, 1.0, (1, 64))  # same sampling seeds in both conditions
        a = true_difference + seed_effect + image_effect + rng.normal(0, 0.2, (5, 64))
        b = seed_effect + image_effect + rng.normal(0, 0.2, (5, 64))
        paired = paired_difference(a, b, draws=500, seed=d)
        covered += not paired.excludes(true_difference)
        paired_widths.append(paired.hi - paired.lo)
        unpaired = excess_over_null(a, b, draws=500, seed=d)  # treats the two as independent
        unpaired_widths.append(unpaired.hi - unpaired.lo)
    assert covered / 60 >= 0.80
    assert np.mean(paired_widths) < 0.2 * np.mean(unpaired_widths)


def test_paired_difference_needs_same_shape():
    with pytest.raises(ValueError):
        paired_difference(np.zeros((3, 4)), np.zeros((3, 5)))


def test_excess_over_null_near_zero_for_identical_generators_and_detects_an_excess():
    rng = np.random.default_rng(3)

    def hits(n_groups: int, rate: float) -> np.ndarray:
        per_group_rate = np.clip(rate + rng.normal(0, 0.05, (n_groups, 1)), 0, 1)
        return (rng.random((n_groups, 64)) < per_group_rate).astype(np.float64)

    covered_zero = detected = 0
    for d in range(60):
        null = hits(4, 0.2)
        same = excess_over_null(hits(5, 0.2), null, draws=500, seed=d)
        covered_zero += not same.excludes(0.0)
        assert abs(same.estimate) < 0.15
        detected += excess_over_null(hits(5, 0.5), null, draws=500, seed=d).lo > 0
    assert covered_zero / 60 >= 0.80
    assert detected / 60 >= 0.95


def test_seed_level_interval_bounds_and_statistic():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan])
    mean = seed_level_interval(values, draws=1000)
    assert mean.estimate == pytest.approx(22.0)
    assert 1.0 <= mean.lo < mean.estimate < mean.hi <= 100.0
    median = seed_level_interval(values, draws=1000, statistic=np.median)
    assert median.estimate == 3.0 and median.hi <= 100.0 and median.lo >= 1.0
    constant = seed_level_interval(np.full(4, 2.5), draws=100)
    assert (constant.lo, constant.estimate, constant.hi) == (2.5, 2.5, 2.5)


# --- curves -----------------------------------------------------------------------------------------

X = np.arange(21) / 20  # 0.3 is a point of the grid (6 / 20 == 0.3 exactly)


def broken_line(x: np.ndarray, rng: np.random.Generator, seeds: int = 3, noise: float = 0.02) -> np.ndarray:
    """Steep rise 3x up to x = 0.3, then a slope of 0.2: a known break at 0.3, plus noise per seed."""
    clean = np.where(x < 0.3, 3.0 * x, 0.9 + 0.2 * (x - 0.3))
    return clean + rng.normal(0, noise, (seeds, x.size))


def test_knee_of_two_lines_with_break_at_0_3():
    result = knee_with_interval(X, broken_line(X, np.random.default_rng(4), noise=0.05), draws=500)
    assert result["knee_x"] == pytest.approx(0.3, abs=0.051)
    interval = result["interval"]
    assert not interval.excludes(0.3) and interval.hi - interval.lo <= 0.2
    assert result["no_knee_fraction"] == 0.0 and result["n_seeds"] == 3


def test_knee_on_log_x_and_curves_without_a_knee():
    learning_rates = np.logspace(-5, -1, 9)  # break at 1e-3, the 5th point, on a log axis
    position = np.log10(learning_rates) + 5
    curve = np.where(position < 2, 0.05 * position, 0.1 + 0.8 * (position - 2))
    result = knee_with_interval(learning_rates, np.stack([curve, curve + 0.01]), log_x=True, draws=200)
    assert result["knee_x"] == pytest.approx(1e-3)
    flat = knee_with_interval(X, np.ones((3, X.size)), draws=50)
    assert flat["knee_x"] is None and flat["interval"] is None and flat["no_knee_fraction"] == 1.0


def test_segment_fits_prefer_two_segments_for_a_broken_line_and_one_for_a_straight_line():
    rng = np.random.default_rng(5)
    two_preferred = one_preferred = 0
    for _ in range(100):
        broken = segment_fits(X, broken_line(X, rng, seeds=3).mean(axis=0))
        two_preferred += broken["prefers_two_segments"]
        assert broken["two_segments"]["breakpoint_x"] == pytest.approx(0.3, abs=0.03)
        assert broken["two_segments"]["slope_before"] == pytest.approx(3.0, abs=0.3)
        straight = segment_fits(X, 0.5 + 0.8 * X + rng.normal(0, 0.02, X.size))
        one_preferred += not straight["prefers_two_segments"]
        assert straight["one_segment"]["slope"] == pytest.approx(0.8, abs=0.05)
    assert two_preferred == 100
    # the breakpoint search fits noise: on 21 points BIC still picks two segments for ~13% of lines
    assert one_preferred >= 75


def test_segment_fits_on_log_x_and_exact_line():
    learning_rates = np.logspace(-5, -1, 9)
    position = np.log10(learning_rates) + 5
    fit = segment_fits(learning_rates, np.where(position < 2.5, 0.0, position - 2.5), log_x=True)
    assert fit["prefers_two_segments"]
    assert np.log10(fit["two_segments"]["breakpoint_x"]) == pytest.approx(-2.5, abs=0.02)
    exact = segment_fits(X, 2.0 * X - 1.0)  # noiseless: both fits exact, the penalty decides
    assert not exact["prefers_two_segments"] and exact["one_segment"]["slope"] == pytest.approx(2.0)
    assert segment_fits([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.0, 1.0])["two_segments"] is None


STEPS = np.arange(0, 2001, 100, dtype=np.float64)


def logistic(steps: np.ndarray, midpoint: float, width: float = 120.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(steps - midpoint) / width))


@pytest.mark.parametrize("midpoint", [430.0, 730.0, 1150.0])
def test_half_way_step_finds_logistic_midpoint_rising_and_falling(midpoint):
    rising = 0.2 + 0.6 * logistic(STEPS, midpoint)
    assert half_way_step(STEPS, rising) == pytest.approx(midpoint, abs=100)
    falling = 5.0 - 3.0 * logistic(STEPS, midpoint)
    assert half_way_step(STEPS, falling) == pytest.approx(midpoint, abs=100)
    shuffled = np.random.default_rng(6).permutation(STEPS.size)
    assert half_way_step(STEPS[shuffled], rising[shuffled]) == half_way_step(STEPS, rising)


def test_half_way_step_interpolates_and_handles_flat_metrics():
    # 0 -> 10 plateau; half-way (5) lies a quarter of the way from step 100 (value 4) to step 200 (value 8)
    assert half_way_step([0, 100, 200, 300, 400, 500], [0, 4, 8, 10, 10, 10]) == pytest.approx(125.0)
    assert half_way_step([0, 100, 200, 300, 400, 500], [0, 4, 8, 10, 10, 10], base=-10.0) == 0.0
    assert half_way_step(STEPS, np.full(STEPS.size, 0.7)) is None


def seeds_of_logistics(rng: np.random.Generator, midpoints: np.ndarray) -> np.ndarray:
    return np.stack([logistic(STEPS, m) + rng.normal(0, 0.01, STEPS.size) for m in midpoints])


def test_crossing_time_ratio_detects_a_doubling_and_not_an_equal_time():
    rng = np.random.default_rng(7)
    doubling_found = equal_included = 0
    for d in range(40):
        first_midpoints = rng.uniform(300, 500, 4)
        first = seeds_of_logistics(rng, first_midpoints)
        doubled = seeds_of_logistics(rng, 2.0 * first_midpoints * rng.normal(1, 0.05, 4))
        ratio = crossing_time_ratio(STEPS, first, doubled, draws=500, seed=d)["geometric_mean_ratio"]
        # half-way from the first checkpoint's value puts the early metric a little late: ratio ~1.95
        doubling_found += ratio.lo > 1.0 and abs(ratio.estimate - 2.0) < 0.15
        same = seeds_of_logistics(rng, first_midpoints * rng.normal(1, 0.05, 4))
        equal_included += not crossing_time_ratio(STEPS, first, same, draws=500, seed=d)[
            "geometric_mean_ratio"].excludes(1.0)
    assert doubling_found == 40
    assert equal_included >= 30


def test_crossing_time_ratio_reports_and_excludes_flat_seeds():
    first = seeds_of_logistics(np.random.default_rng(8), np.array([400.0, 450.0, 500.0]))
    second = seeds_of_logistics(np.random.default_rng(9), np.array([800.0, 900.0, 1000.0]))
    second[1] = 0.5  # a run whose second metric never moves
    result = crossing_time_ratio(STEPS, first, second, draws=200)
    assert result["excluded"] == [1] and result["second_times"][1] is None and result["ratios"][1] is None
    assert result["ratios"][0] == pytest.approx(2.0, abs=0.3)
    assert result["geometric_mean_ratio"].estimate == pytest.approx(2.0, abs=0.3)


def test_value_at_matched_reads_y_where_x_reaches_targets():
    x_sorted = np.array([[0.1, 0.4, 0.6, 0.95], [0.2, 0.5, 0.7, 0.85]])
    y = 2.0 * x_sorted + np.array([[0.0], [1.0]])  # seed k: y = 2x + k
    order = np.array([[2, 0, 3, 1], [3, 1, 0, 2]])  # sweeps need not be sorted by x
    x_unsorted, y_unsorted = np.take_along_axis(x_sorted, order, 1), np.take_along_axis(y, order, 1)
    got = value_at_matched(x_unsorted, y_unsorted, [0.5, 0.8, 0.9])
    expected = np.array([[1.0, 1.6, 1.8], [2.0, 2.6, np.nan]])  # 0.9 is beyond seed 1's largest x (0.85)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    with_gap = value_at_matched([[0.0, np.nan, 1.0]], [[0.0, 7.0, 10.0]], [0.25, -0.1])
    np.testing.assert_allclose(with_gap, [[2.5, np.nan]])


def test_value_at_first_crossing_reads_the_way_up_not_a_later_dip():
    from pti_plugin.metrics.curves import value_at_first_crossing

    # Seed 0 rises 0.6 -> 1.0 then dips to 0.98: coarse 0.8 is reached half-way along the first segment,
    # where y goes 0.3 -> 0.4 (0.35); sorting by x would pair 0.6 with the dip's 0.98 and read 0.50.
    x = [[0.6, 1.0, 0.98], [0.2, 0.5, 0.9]]
    y = [[0.3, 0.4, 0.7], [1.0, 2.0, 6.0]]
    got = value_at_first_crossing(x, y, [0.8, 0.6, 0.95])
    # seed 0 at 0.95: 7/8 of the first segment (0.3875); seed 1 at 0.8: 3/4 of the way 2 -> 6 (5.0); 0.95 never.
    expected = [[0.35, 0.3, 0.3875], [5.0, 3.0, np.nan]]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # Starting above the target is not a crossing; NaN points are skipped.
    np.testing.assert_allclose(value_at_first_crossing([[0.9, 1.0]], [[1.0, 2.0]], [0.5]), [[np.nan]])
    np.testing.assert_allclose(value_at_first_crossing([[0.0, np.nan, 1.0]], [[0.0, 7.0, 10.0]], [0.25]), [[2.5]])


def test_resampled_interval_matches_the_normal_theory_interval_of_a_mean():
    values = np.random.default_rng(3).normal(2.0, 1.5, 400)
    got = resampled_interval(len(values), lambda p: float(values[p].mean()), draws=3000, seed=1)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert got.estimate == pytest.approx(values.mean())
    assert got.lo == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert got.hi == pytest.approx(values.mean() + half, abs=0.15 * half)


def test_resampled_interval_leaves_out_non_finite_resamples():
    # nan whenever item 4 is drawn: the interval comes from the other resamples alone, each a mean of ones
    values = np.array([1.0, 1.0, 1.0, 1.0, 5.0])
    got = resampled_interval(5, lambda p: float("nan") if 4 in p else float(values[p].mean()), draws=200)
    assert (got.lo, got.hi) == (1.0, 1.0)
    none_left = resampled_interval(3, lambda p: float("nan"), draws=50)
    assert np.isnan(none_left.lo) and np.isnan(none_left.hi)


def test_same_lr_matches_a_rate_read_back_but_not_a_neighbouring_grid_rate():
    from pti_plugin.metrics.replication import same_lr

    written = 0.1 * 3 * 1e-3  # 3.0000000000000004e-4: a rate computed, not typed
    read_back = float("3e-4")  # the same rate parsed from a folder name or a TOML file
    assert written != read_back and same_lr(written, read_back)
    for neighbour in (2.75e-4, 3.1e-4, 4e-4):
        assert not same_lr(read_back, neighbour)
