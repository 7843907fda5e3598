"""H3's statistics after the audit: two-level intervals at the matched point, the null paired image by image,
the verdict's "untestable", the confirmatory tests' small-sample check, no interval from fewer than 3 seeds,
and plots whose legends cover no data. Every expected figure below is worked out by hand from the data."""

from __future__ import annotations

import math

import pytest

from pti_plugin.protocol.h3_detail_axis import CEILING_TEST, ceiling_verdict, confirmatory_verdict, detail_axis_lines, \
    detail_axis_summary
from pti_plugin.protocol.h3_lines import verdict, verdict_check
from pti_plugin.protocol.h3_summary import summarise_h3

N = 64  # images per cell, one per sampling seed
SEEDS = (42, 1, 2)
THIRD = [1 if j % 3 == 0 else 0 for j in range(N)]  # the null's training-cell flags: 22 of 64, image by image


def _ones(k: int) -> list[int]:
    return [1] * k + [0] * (N - k)


def _cell(variant, weight, lr, seed, coarse, leakage, **more) -> dict:
    return {"variant": variant, "weight": weight, "lr": lr, "seed": seed, "coarse": coarse,
            "in_training_cell": leakage, "drift": [0] * N} | more


def _null() -> dict:
    return {name: {"in_training_cell": list(THIRD)} for name in ("a", "b")}


def test_matched_leakage_interval_resamples_the_images_as_well_as_the_training_seeds():
    """Three seeds with the same images: over seeds alone the interval has no width (the old reading); the
    images' own noise widens it. Where every image of a cell agrees, both levels give the seeds' bootstrap,
    here exactly [0, 0.8] (per-seed values 0.8, 0, 0.8: a draw of three zeros has chance 1/27 > 2.5%)."""
    mixed = [j % 2 for j in range(N)]  # leakage 0.5, its ones spread over the images
    varying = [_cell("none", None, lr, s, coarse, leak) for s in SEEDS
               for lr, coarse, leak in ((0.0, [0] * N, [0] * N), (1e-3, _ones(48), mixed), (1e-2, [1] * N, mixed))]
    entry = summarise_h3(None, varying, draws=500)["conditions"][0]["matched"]["0.8"]["leakage"]
    assert entry["estimate"] == pytest.approx(0.5)  # 0.8 reached a fifth up 1e-3 -> 1e-2, leakage 0.5 at both ends
    assert entry["lo"] < 0.45 and entry["hi"] > 0.55 and entry["n_seeds"] == 3
    agreeing = [_cell("none", None, lr, s, coarse, leak) for s in SEEDS
                for lr, coarse, leak in ((0.0, [0] * N, [0] * N), (1e-3, [1] * N, [int(s != 1)] * N))]
    entry = summarise_h3(None, agreeing, draws=2000)["conditions"][0]["matched"]["0.8"]["leakage"]
    assert (entry["estimate"], entry["lo"], entry["hi"]) == pytest.approx((1.6 / 3, 0.0, 0.8))
    assert entry["per_seed"] == pytest.approx({"1": 0.0, "2": 0.8, "42": 0.8})


def test_the_excess_over_the_null_is_paired_image_by_image():
    """Cells that put the same images in training cells as the null have an excess of exactly 0 on every draw;
    8 more images in training cells (where the null has none) is 8/64 on the images and, resampled, a
    binomial count of those 8 (95% between about 3 and 13 of 64): above the null, which an unpaired
    comparison with the null's own sampling noise (about +-0.12) could not tell."""
    extra = [1 if (j % 3 == 0 or j in (1, 2, 4, 5, 7, 8, 10, 11)) else 0 for j in range(N)]
    assert sum(extra) - sum(THIRD) == 8
    cells = [_cell("none", None, lr, s, [1] * N, leak) for s in SEEDS for lr, leak in ((1e-4, THIRD), (1e-3, extra))]
    same, more = summarise_h3(_null(), cells, draws=500)["conditions"][0]["rows"]
    assert (same["training_cell_excess"]["estimate"], same["training_cell_excess"]["lo"],
            same["training_cell_excess"]["hi"]) == pytest.approx((0.0, 0.0, 0.0)) and same["inside_null"]
    excess = more["training_cell_excess"]
    assert excess["estimate"] == pytest.approx(8 / 64)
    assert 0.02 < excess["lo"] < 8 / 64 < excess["hi"] < 0.25 and more["inside_null"] is False


def _verdict_grid(coarse_first: int, leakage_first: list[int], late_leakage: list[int] | None = None) -> list[dict]:
    """No regulariser and ``half_angle`` w1 from the same pivots (coarse 32/64, leakage the null's) through lr 1e-5
    (coarse ``coarse_first``/64; leakage the null's for none, ``leakage_first`` for half_angle) to 1e-3 (coarse 1,
    leakage 0.75 for none, ``late_leakage`` or 0.75 for half_angle)."""
    cells = []
    for variant, weight in (("none", None), ("half_angle", 1.0)):
        first = THIRD if variant == "none" else leakage_first
        late = _ones(48) if variant == "none" or late_leakage is None else late_leakage
        cells += [_cell(variant, weight, lr, s, coarse, leak) for s in SEEDS
                  for lr, coarse, leak in ((0.0, _ones(32), THIRD), (1e-5, _ones(coarse_first), first), (1e-3, [1] * N, late))]
    return cells


def test_the_verdict_is_untestable_when_the_matched_point_falls_before_any_trained_rate():
    # Both reach coarse 0.8 between the pivot alone (0.5) and lr 1e-5 (0.9), where neither has left the pivot's
    # images: every paired difference is exactly 0. The old rule read its [0, 0] as "not supported".
    summary = summarise_h3(_null(), _verdict_grid(58, THIRD), draws=300)
    reading = verdict(summary)
    assert reading.startswith("untestable: in 3 of 3 paired seeds a side reaches coarse 0.8 below the first trained "
                              "LoRA rate") and "3 of the 3 paired differences are exactly 0" in reading, reading
    assert "the rule reads **untestable** with it" in verdict_check(summary)
    # half_angle leaks less at 1e-5 (3 fewer images): differences are not 0, but still read before any trained rate
    fewer = [0 if j % 24 == 0 else v for j, v in enumerate(THIRD)]
    reading = verdict(summarise_h3(_null(), _verdict_grid(58, fewer), draws=300))
    assert reading.startswith("untestable: in 3 of 3 paired seeds") and "exactly 0" not in reading, reading


def test_the_verdict_reads_its_interval_when_the_matched_point_is_a_trained_one():
    # coarse 0.6 at lr 1e-5: 0.8 is reached between 1e-5 and 1e-3 (half-way up), where half_angle leaks 0.25
    # against 0.75: per seed (0.344 + 0.25) / 2 - (0.344 + 0.75) / 2 = -0.25.
    summary = summarise_h3(_null(), _verdict_grid(38, THIRD, _ones(16)), draws=300)
    difference = summary["variants"]["half_angle"]["matched"]["0.8"]["leakage_minus_none"]
    assert difference["estimate"] == pytest.approx(-0.25, abs=0.01)  # 38/64 = 0.594: 0.8 is 49% up the segment
    assert difference["below_first_rate"] == 0 and difference["zero_differences"] == 0
    assert verdict(summary).startswith("supported: -0.2")


def test_fewer_than_three_seeds_give_their_values_not_an_interval():
    cells = []
    for seed, leak in ((42, 0.35), (1, 0.45)):  # leakage where the true-size detail first reaches 0.25 (at lr 1e-4)
        for lr, detail, leakage in ((0.0, 0.0, 0.33), (1e-4, 0.25, leak), (1e-3, 0.1, 0.7)):
            cells.append({"variant": "half_angle", "weight": 1.0, "lr": lr, "seed": seed, "drift": [0] * 100,
                          "true_size_detail": [1] * round(100 * detail) + [0] * (100 - round(100 * detail)),
                          "in_training_cell": [1] * round(100 * leakage) + [0] * (100 - round(100 * leakage))})
    summary = detail_axis_summary(None, cells, draws=200)
    entry = summary["conditions"][0]["matched"]["0.25"]
    assert entry["leakage"]["estimate"] == pytest.approx(0.40) and entry["leakage"]["lo"] is None
    assert "| 0.25 | 2 | 0.45, 0.35 (2 seeds) |" in "\n".join(detail_axis_lines(summary))


def test_the_second_confirmatory_verdict_prints_its_small_sample_check():
    """Per seed, weight 0.1's true-size detail under the ceiling is 7, 16, 0, 9 and 0 of 64 images (at lr 5e-4),
    no regulariser's 0: mean 0.100; Student's t with 4 degrees of freedom (2.776445) over sd 6.7305/64 gives
    0.100 +- 0.1306, i.e. [-0.031, 0.231]: inconclusive by the small-sample check."""
    sd = math.sqrt(sum((k - 6.4) ** 2 for k in (7, 16, 0, 9, 0)) / 4) / 64
    assert 2.776445 * sd / math.sqrt(5) == pytest.approx(0.1306, abs=1e-4)
    cells = []
    for seed, k in zip(CEILING_TEST["seeds"], (7, 16, 0, 9, 0)):
        for lr in CEILING_TEST["lrs"]:
            for variant, weight, detail in (("half_angle", 0.1, k if lr == 5e-4 else 0), ("none", None, 0)):
                cells.append({"variant": variant, "weight": weight, "lr": lr, "seed": seed,
                              "true_size_detail": _ones(detail), "in_training_cell": list(THIRD)})
    reading = ceiling_verdict(cells, draws=300)
    assert ": 0.100 [" in reading and "5 paired seeds" in reading, reading
    assert ("small-sample check (Student's t over the 5 paired seeds): 0.100 [-0.031, 0.231], which the rule reads "
            "as inconclusive") in reading, reading


def test_the_first_confirmatory_verdict_prints_its_small_sample_check():
    """Every seed reaches true-size detail 0.5 at leakage 0.42 under weight 0.1 and 0.6633 without a regulariser
    (linear on their crossing segments): the same difference -0.243 on each, so Student's t has no width."""
    def cells(variant, weight, curve):
        return [{"variant": variant, "weight": weight, "lr": lr, "seed": seed, "drift": [0] * 100,
                 "true_size_detail": [1] * round(100 * d) + [0] * (100 - round(100 * d)),
                 "in_training_cell": [1] * round(100 * p) + [0] * (100 - round(100 * p))}
                for seed in (5, 6, 7) for lr, (d, p) in zip((0.0, 1e-4, 3e-4, 1e-3), curve)]

    reading = confirmatory_verdict(cells("none", None, [(0.0, 0.33), (0.1, 0.33), (0.3, 0.53), (0.6, 0.73)])
                                   + cells("half_angle", 0.1, [(0.0, 0.33), (0.3, 0.36), (0.6, 0.45), (0.2, 0.7)]),
                                   draws=300)
    assert ("small-sample check (Student's t over the 3 paired seeds): -0.243 [-0.243, -0.243], which the rule "
            "reads as supported") in reading, reading


def _overlaps_any_axes(fig) -> bool:
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends
    return any(legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
               for legend in legends for ax in fig.axes if ax.get_visible() and ax.axison)


def test_h3_plot_has_a_panel_per_variant_and_no_legend_over_data():
    import matplotlib.pyplot as plt

    from pti_plugin.protocol.h3_lines import h3_figure

    cells = _verdict_grid(38, THIRD, _ones(16)) + [c | {"variant": "reg_images"} for c in _verdict_grid(38, THIRD)
                                                  if c["variant"] == "half_angle"]
    fig = h3_figure(summarise_h3(_null(), cells, draws=50))  # laid out (tight_layout): legends placed
    assert [ax.get_title() for ax in fig.axes[:2]] == ["half_angle", "reg_images"]  # none is in each panel
    assert len(fig.axes) == 8 and all(len(ax.containers) == 2 for ax in fig.axes)  # none and the variant
    assert not _overlaps_any_axes(fig)
    plt.close(fig)
