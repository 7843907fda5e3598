"""H3's secondary axis: leakage read where the true-size detail first reaches a target."""

from __future__ import annotations

import re

import pytest

from pti_plugin.protocol.h3_detail_axis import (CEILING_TEST, ceiling_verdict, confirmatory_verdict, detail_axis_lines,
                                                detail_axis_summary)

N = 100  # images per cell: every share below is a whole number of them


def _share(p: float) -> list[int]:
    k = round(p * N)
    return [1] * k + [0] * (N - k)


def _cells(variant, weight, curve, seeds=(42, 1, 2), rates=(0.0, 1e-4, 3e-4, 1e-3)):
    """One cell per (lr, seed) with the given (true-size detail, training-cell fraction) per rate."""
    return [{"variant": variant, "weight": weight, "lr": lr, "seed": seed, "true_size_detail": _share(detail),
             "in_training_cell": _share(leak), "drift": _share(0.1 if lr else 0.0)}
            for seed in seeds for lr, (detail, leak) in zip(rates, curve)]


NONE = [(0.0, 0.33), (0.1, 0.33), (0.3, 0.53), (0.6, 0.73)]  # reaches 0.25 three quarters up its third segment
LOCALITY = [(0.0, 0.33), (0.25, 0.35), (0.2, 0.6), (0.1, 0.7)]  # reaches 0.25 at 1e-4 exactly, never 0.5


def test_leakage_is_read_where_the_detail_first_reaches_each_target():
    null = {"a": {"in_training_cell": _share(1 / 3)}}
    summary = detail_axis_summary(null, _cells("none", None, NONE) + _cells("half_angle", 1.0, LOCALITY), draws=200)
    by = {c["variant"]: c for c in summary["conditions"]}
    none, locality = by["none"]["matched"], by["half_angle"]["matched"]
    assert none["0.25"]["seeds_reaching"] == 3 and none["0.5"]["seeds_reaching"] == 3
    assert none["0.25"]["leakage"]["estimate"] == pytest.approx(0.33 + 0.75 * 0.20)  # 0.48, interpolated
    assert none["0.5"]["leakage"]["estimate"] == pytest.approx(0.53 + (0.2 / 0.3) * 0.20)
    assert locality["0.25"]["leakage"]["estimate"] == pytest.approx(0.35)
    assert locality["0.5"]["seeds_reaching"] == 0 and locality["0.5"]["leakage"] is None
    paired = locality["0.25"]["leakage_minus_none"]
    assert paired["estimate"] == pytest.approx(0.35 - 0.48) and paired["n_paired"] == 3
    assert by["half_angle"]["reached"]["estimate"] == pytest.approx(0.25)  # its peak, not its last rate
    assert by["none"]["reached"]["estimate"] == pytest.approx(0.6)
    assert summary["n_cells"] == 18 and summary["not_measured"] == []
    lines = "\n".join(detail_axis_lines(summary))
    assert "after an exploratory look" in lines  # the highest detail's interval resamples the images too
    assert re.search(r"\| half_angle \(w 1\) \| 3 \| 3: 0.0001 to 0.001 \| 0.25 \[[\d.]+, [\d.]+\] \| 0.5 \| 0 \| n/a", lines)


def test_conditions_with_a_cell_not_read_are_left_off_the_axis():
    cells = _cells("none", None, NONE) + _cells("reg_images", 3.0, NONE)
    del cells[-1]["true_size_detail"]  # an archived cell whose images were never read
    summary = detail_axis_summary(None, cells, draws=100)
    assert [c["variant"] for c in summary["conditions"]] == ["none"]
    assert summary["not_measured"] == ["reg_images (w 3)"] and summary["n_cells"] == 9
    assert "Not on this axis" in "\n".join(detail_axis_lines(summary))


WEAK = [(0.0, 0.33), (0.3, 0.36), (0.6, 0.45), (0.2, 0.7)]  # reaches 0.5 two thirds up its second segment: 0.42
LEAKY = [(0.0, 0.33), (0.3, 0.6), (0.6, 0.8), (0.2, 0.8)]  # the same crossing at leakage 0.733; none's is 0.663


@pytest.mark.parametrize("curve, seeds, expected", [
    (WEAK, (5, 6, 7), "supported: -0.24"),  # 0.42 - 0.663, 3 seeds reach 0.5
    (WEAK, (5, 6), "inconclusive: -0.24"),  # below 0, but 2 seeds are fewer than the rule asks
    (LEAKY, (5, 6, 7), "refuted: 0.07"),
])
def test_the_confirmatory_rule_decides_on_the_paired_difference_and_the_seeds_reaching(curve, seeds, expected):
    cells = _cells("none", None, NONE, seeds=(5, 6, 7)) + _cells("half_angle", 0.1, curve, seeds)
    verdict = confirmatory_verdict(cells, draws=100)
    assert verdict.startswith(expected), verdict
    assert f"{len(seeds)} of {len(seeds)} training seeds reach 0.5, {len(seeds)} paired" in verdict


def test_one_paired_seed_gives_no_interval_and_so_no_decision():
    """Three seeds reach 0.5 under weight 0.1 but no regulariser reaches it in only one: the paired
    "interval" would be that one difference, [x, x], which must not read as supported."""
    never = [(0.0, 0.33), (0.1, 0.33), (0.3, 0.53), (0.4, 0.73)]  # no regulariser's detail stops at 0.4
    cells = (_cells("none", None, NONE, seeds=(5,)) + _cells("none", None, never, seeds=(6, 7))
             + _cells("half_angle", 0.1, WEAK, seeds=(5, 6, 7)))
    verdict = confirmatory_verdict(cells, draws=100)
    assert verdict.startswith("inconclusive: -0.24") and "3 of 3 training seeds reach 0.5, 1 paired" in verdict
    assert re.search(r"\| half_angle \(w 0.1\) \| 3 \| 3: 0.0001 to 0.001 \| 0.60 \[[\d.]+, [\d.]+\] \| 0.5 \| 3 \| "
                     r"0.42 \[[\d.]+, [\d.]+\] \| n/a \| -0.24 \(1 seed\) \|",
                     "\n".join(detail_axis_lines(detail_axis_summary(None, cells, draws=100))))


def test_no_confirmatory_verdict_without_its_condition_on_its_stated_seeds():
    cells = _cells("none", None, NONE, seeds=(5, 6, 7)) + _cells("half_angle", 1.0, WEAK, seeds=(5, 6, 7))
    assert confirmatory_verdict(cells, draws=100) is None  # weight 1, not the test's 0.1
    exploration = _cells("none", None, NONE) + _cells("half_angle", 0.1, WEAK)  # seeds 42, 1, 2: not the test's
    assert confirmatory_verdict(exploration, draws=100) is None
    assert ceiling_verdict(exploration, draws=100) is None


# The second test's rates (lr 0, the pivot alone, first): (true-size detail, training-cell fraction) per rate.
CEILING_SEEDS, CEILING_LRS = CEILING_TEST["seeds"], CEILING_TEST["lrs"]
UNDER = [(0.0, 0.33), (0.2, 0.40), (0.5, 0.45), (0.8, 0.60), (0.9, 0.70)]  # 0.5 under the ceiling; 0.8, 0.9 above it
PLAIN = [(0.0, 0.33), (0.1, 0.38), (0.2, 0.44), (0.4, 0.55), (0.5, 0.75)]  # 0.2 under the ceiling


def test_the_ceiling_test_reads_the_best_detail_under_the_ceiling_and_pairs_it():
    cells = _cells("none", None, PLAIN, CEILING_SEEDS, CEILING_LRS) + _cells("half_angle", 0.1, UNDER, CEILING_SEEDS, CEILING_LRS)
    cells += _cells("half_angle", 0.1, [(1.0, 0.40)], CEILING_SEEDS, (1e-2,))  # a rate the test did not state: ignored
    verdict = ceiling_verdict(cells, draws=100)
    # 0.5 - 0.2 on every seed (Student's t: no spread over seeds); the two-level interval adds the images' noise
    assert verdict.split(" [")[0].endswith(": 0.300"), verdict
    assert "0.300 [0.300, 0.300], which the rule reads as supported" in verdict
    assert "5 paired seeds; mean detail under the ceiling w0.1 0.50, none 0.20" in verdict
    reversed_ = _cells("none", None, UNDER, CEILING_SEEDS, CEILING_LRS) + _cells("half_angle", 0.1, PLAIN, CEILING_SEEDS, CEILING_LRS)
    assert "-0.300 [-0.300, -0.300], which the rule reads as refuted" in ceiling_verdict(reversed_, draws=100)


def test_the_ceiling_test_drops_seeds_missing_a_rate_and_needs_four_pairs():
    cells = _cells("none", None, PLAIN, CEILING_SEEDS, CEILING_LRS) + _cells("half_angle", 0.1, UNDER, CEILING_SEEDS, CEILING_LRS)
    incomplete = [c for c in cells if not (c["seed"] in CEILING_SEEDS[:2] and c["lr"] == 5e-4 and c["variant"] == "none")]
    verdict = ceiling_verdict(incomplete, draws=100)
    assert verdict.startswith("inconclusive: 0.300") and "3 paired seeds" in verdict, verdict


def test_a_cell_without_objects_does_not_count_as_under_the_ceiling():
    cells = _cells("none", None, PLAIN, CEILING_SEEDS, CEILING_LRS) + _cells("half_angle", 0.1, UNDER, CEILING_SEEDS, CEILING_LRS)
    for cell in cells:
        if cell["variant"] == "half_angle" and cell["lr"] == 4e-4:  # its 0.5 drawn with no object in any image
            cell["in_training_cell"] = [None] * N
    verdict = ceiling_verdict(cells, draws=100)  # w0.1's best under the ceiling falls back to 0.2, none's
    assert verdict.split(" [")[0].endswith(": 0.000") and "w0.1 0.20, none 0.20" in verdict, verdict
