"""The verdicts' small-sample check: each hypothesis's deciding interval read again with Student's t over the
training seeds, on data whose t interval is computed by hand here (t(2, 0.975) = 4.3027), including cases
where the percentile bootstrap and Student's t lead the same rule to different readings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pti_plugin.protocol.h1_summary import verdict as h1_verdict
from pti_plugin.protocol.h3_lines import verdict as h3_verdict, verdict_check
from pti_plugin.protocol.h3_summary import paired_against
from pti_plugin.protocol.protocol_report import h2_check, h2_overall, h2_verdict

T2 = 4.302653  # Student's t quantile 0.975 with 2 degrees of freedom


def test_h3_check_is_the_t_interval_of_the_paired_seed_differences_and_can_read_otherwise():
    values = {1: np.array([0.1]), 2: np.array([0.3]), 3: np.array([0.2])}
    reference = {1: np.array([0.0]), 2: np.array([0.0]), 3: np.array([0.0]), 4: np.array([0.5])}  # seed 4 unpaired
    difference = paired_against(values, reference, 0, draws=500)
    half = T2 * 0.1 / math.sqrt(3)  # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1
    assert difference["n_paired"] == 3
    assert difference["student"]["estimate"] == pytest.approx(0.2)
    assert (difference["student"]["lo"], difference["student"]["hi"]) == pytest.approx((0.2 - half, 0.2 + half))
    summary = {"variants": {"half_angle": {"chosen": {"weight": 1.0},
                                           "matched": {"0.8": {"seeds_reaching": 3, "leakage_minus_none": difference}}}}}
    # the bootstrap over 3 seeds stays within [0.1, 0.3]: "not supported"; Student's t reaches below 0
    assert h3_verdict(summary).startswith("not supported: 0.200 [0.1")
    assert f"{0.2 - half:.3f}".replace("-", "−") in verdict_check(summary).replace("-", "−")
    assert "the rule reads **inconclusive** with it" in verdict_check(summary)


def _h2_summary(ratios: list[float]) -> dict:
    learned = [0.2, 0.8, 0.8, 0.8]  # plateau 0.8, above the null's upper bound 0.5 below
    record = {"ratios": ratios, "ratio": {"estimate": 4.0, "lo": min(ratios), "hi": max(ratios)}}
    return {"position": {"per_run": [learned] * len(ratios)}, "steps_ratio": record}


def test_h2_check_reads_the_t_interval_of_the_log_ratios():
    summary = _h2_summary([2.0, 4.0, 8.0])  # logs: mean ln 4, sd ln 2
    half = T2 * math.log(2) / math.sqrt(3)
    interval, reading = h2_check(summary, null_hi=0.5)
    assert interval["estimate"] == pytest.approx(4.0)
    assert (interval["lo"], interval["hi"]) == pytest.approx((4 * math.exp(-half), 4 * math.exp(half)))
    assert interval["lo"] < 1 and reading == "inconclusive"
    assert h2_verdict(summary, null_hi=0.5) == "holds"  # the bootstrap's [2, 8] lies above 1
    line = h2_overall({"0.001": "holds"}, {"0.001": (interval, reading)})
    assert line.startswith("**Verdict: supported.**") and "the rule reads **inconclusive** with them" in line
    assert h2_check(_h2_summary([30.0, 40.0, 50.0]), null_hi=0.5)[1] == "holds"


def _h1_cells(lr: float, per_seed_edit: list[float]) -> list[dict]:
    """One cell per training seed whose 64 images score ``per_seed_edit`` on both edit kinds."""
    return [{"lr": lr, "seed": seed, "vectors": 1, "joint_edit": [value] * 64, "joint_background_edit": [value] * 64}
            for seed, value in zip((42, 1, 2), per_seed_edit)]


def test_h1_check_reads_the_rule_on_the_t_intervals_of_the_per_seed_drops():
    groups = {1e-4: _h1_cells(1e-4, [1.0, 1.0, 1.0]), 1e-2: _h1_cells(1e-2, [0.5, 0.95, 0.95])}
    rows = [{"lr": lr, "coarse": {"estimate": 1.0},
             **{key: {"estimate": float(np.mean([c[key][0] for c in cells]))} for key in ("joint_edit", "joint_background_edit")}}
            for lr, cells in groups.items()]
    knees = {"output_angle_layernorm_deg": {"knee_x": 6.6, "no_knee_fraction": 0.0}}
    result = h1_verdict(rows, groups, knees, draws=500)
    drop = result["editability_drops"]["joint_edit"]
    half = T2 * math.sqrt((0.3 ** 2 + 2 * 0.15 ** 2) / 2) / math.sqrt(3)  # drops -0.5, -0.05, -0.05: mean -0.2
    assert drop["farthest_minus_best_student"]["estimate"] == pytest.approx(-0.2)
    assert drop["farthest_minus_best_student"]["hi"] == pytest.approx(-0.2 + half)
    assert result["verdict"] == "supported"  # every bootstrap resample of these seeds drops
    assert result["verdict_student"] == "inconclusive"  # Student's interval reaches above 0
