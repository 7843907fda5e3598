"""The research report's H1, H2, internal-metric and position-band readings after a reviewer's audit: what a knee
interval of zero width means, BIC differences too small to read, the within-rate correlation without rates where
the truth does not vary, H2's threshold against the curves' own prompts, the band's resolution, readable plots."""

import json
import runpy
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


# --- H1: the knee and the segment fits ----------------------------------------------------------------------------
def _grid() -> tuple[list[dict], dict]:
    """Six rates at angles 1..6, every training seed with the same curve: its knee (maximum distance to the chord on
    axes scaled to [0, 1]: y - x = 0, -0.1, 0.5, 0.35, 0.17, 0) is the third point, whatever the resample."""
    rows = [{"lr": lr, "output_angle_layernorm_deg": float(a), "pivot_l2_from_init": a / 10}
            for lr, a in zip([1e-5, 2e-5, 3e-5, 1e-4, 1e-3, 1e-2], range(1, 7))]
    curve = [0.0, 0.1, 0.9, 0.95, 0.97, 1.0]
    groups = {r["lr"]: [{"seed": s, "coarse": [curve[i]] * 4, "joint_edit": [1.0] * 4} for s in (1, 2, 3)]
              for i, r in enumerate(rows)}
    return rows, groups


def test_a_zero_width_knee_interval_is_called_grid_limited_with_the_knees_rate_and_neighbours():
    from pti_plugin.protocol.h1_summary import knee_and_fits
    from pti_plugin.protocol.protocol_report import h1_lines

    knees = knee_and_fits(*_grid(), draws=50)
    knee = knees["output_angle_layernorm_deg"]
    assert knee["interval"] == {"estimate": 3.0, "lo": 3.0, "hi": 3.0}
    assert knee["knee_lr"] == 3e-5
    assert knee["grid_neighbours"] == [{"lr": 2e-5, "x": 2.0}, {"lr": 1e-4, "x": 4.0}]
    line = _knee_lines(h1_lines, knees)[0]
    assert line.startswith("- Knee of coarse reconstruction against `output_angle_layernorm_deg`: 3 at lr 3e-05 (")
    assert "grid-limited" in line and "no more finely than between 2 (lr 2e-05) and 4 (lr 0.0001)" in line


def _knee_lines(h1_lines, knees: dict) -> list[str]:
    """The report's knee bullets of a summary holding only ``knees``."""
    summary = {"rows": [], "knees": knees, "null": None, "vectors": [], "verdict": None}
    return [line for line in h1_lines(summary) if line.startswith("- Knee of")]


def test_a_bic_difference_below_two_is_no_evidence_either_way():
    """The committed angle fits (BIC -19.46 for one line, -20.52 for two segments) were read "two segments
    preferred"; a difference of 1.1 is no evidence. The token-L2 fits (7.1) still prefer two segments."""
    from pti_plugin.protocol.protocol_report import h1_lines

    def knee(one: float, two: float) -> dict:
        fits = {"n_points": 9, "one_segment": {"bic": one}, "prefers_two_segments": two < one,
                "two_segments": {"bic": two, "breakpoint_x": 10.66}}
        return {"knee_x": 6.56, "interval": {"estimate": 6.56, "lo": 6.2, "hi": 10.7}, "no_knee_fraction": 0.0,
                "segments_coarse": fits}

    angle, l2, line = _knee_lines(h1_lines, {"a": knee(-19.458, -20.523), "b": knee(-13.089, -20.197),
                                             "c": knee(-20.0, -15.0)})
    assert angle.endswith("a difference of 1.1 (below 2): no evidence either way.")
    assert "two segments preferred by 7.1, breaking at 10.7" in l2
    assert line.endswith("one line preferred by 5.0.")


def test_h1_plot_places_the_rate_labels_clear_of_each_other_and_of_the_markers(tmp_path, monkeypatch):
    """The committed grid's angles crowd near the knee (4.9, 5.8, 6.2, 6.6 degrees) and on the plateau (18, 21.7):
    the labels at one fixed offset overlapped there."""
    import matplotlib.pyplot as plt

    from pti_plugin.protocol.protocol_report import SCORES, h1_plot

    angles = [0.74, 2.54, 4.92, 5.82, 6.21, 6.56, 10.7, 18.0, 21.7, 81.3]
    coarse = [0.0, 0.0, 0.026, 0.161, 0.589, 0.896, 0.995, 1.0, 1.0, 0.719]
    rates = [3e-6, 1e-5, 2e-5, 2.5e-5, 2.75e-5, 3e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    point = lambda v: {"estimate": v, "lo": v, "hi": v}  # noqa: E731
    rows = [{"lr": lr, "output_angle_layernorm_deg": a} | {key: point(0.0) for key in SCORES} | {"coarse": point(c)}
            for lr, a, c in zip(rates, angles, coarse)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    h1_plot({"rows": rows, "knees": {}, "null": None}, tmp_path / "h1.png")
    ax = figures[0].axes[0]
    renderer = figures[0].canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert sorted(text.get_text() for text in ax.texts) == sorted(f"{lr:g}" for lr in rates)
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    markers = ax.transData.transform([(a, y) for a, c in zip(angles, coarse) for y in (c, 0.0)])
    assert not [m for m in markers for box in boxes if box.contains(*m)]
    plt.close(figures[0])


# --- H2: the threshold's prompts -----------------------------------------------------------------------------------
def _h2_record(plateaus: list[float]) -> dict:
    """Curves of 3 runs starting at the pivot's 0.28 on the curves' prompts and ending at ``plateaus``."""
    ratio = {"t_app": [5.0] * 3, "t_pos": [50.0] * 3, "ratios": [10.0] * 3, "excluded": [],
             "ratio": {"estimate": 10.0, "lo": 8.0, "hi": 12.0}}
    return {"summary": {"n_runs": 3, "steps": [0.0, 10.0, 20.0, 30.0, 40.0], "first_step": 0.0,
                        "appearance": {"per_run": [[0.4, 0.9, 1.0, 1.0, 1.0]] * 3},
                        "position": {"per_run": [[0.28, 0.3, p, p, p] for p in plateaus],
                                     "mean": [{"estimate": 0.28, "lo": 0.23, "hi": 0.32}]},
                        "t_app_mean": 5.0, "t_pos_mean": 50.0, "steps_ratio": ratio, "delta_norm_ratio": ratio}}


def test_h2_section_says_where_its_threshold_comes_from_and_reads_the_rule_against_the_pivots_own_prompts(tmp_path):
    """At LoRA lr 1e-2 the committed plateaus (0.34, 0.31, 0.33) lie below H1's null bound 0.47 (four other
    templates) but two lie above the pivot's own 0.32 on the curves' two prompts."""
    from pti_plugin.protocol.protocol_sections import h2_section

    for lr, plateaus in (("0.001", [0.8, 0.79, 0.68]), ("0.01", [0.34, 0.31, 0.33])):
        (tmp_path / f"h2_curves-lr{lr}.json").write_text(json.dumps(_h2_record(plateaus)))
    lines = h2_section(tmp_path / "no_working_folder", tmp_path, null_hi=0.47)["lines"]
    assert "position not learned" in lines[0] and "holds at lr 0.001" in lines[0]  # the stated rule, unchanged
    threshold = next(line for line in lines if line.startswith("The threshold 0.47 is H1's null upper bound"))
    assert "the pivot alone (each curve's first point, before any LoRA step) reads 0.28 [0.23, 0.32]" in threshold
    assert "lr 0.001: holds; lr 0.01: inconclusive: position learned in 2 of 3 runs" in threshold
    assert threshold.endswith("the rule would read **supported**.")


# --- the internal metrics: within a rate, without rates where the truth does not vary -----------------------------
def test_within_rate_reading_is_also_given_without_rates_whose_truth_varies_by_less_than_one_image(tmp_path):
    """Rate 1e-5: the truth is 21 or 22 images of 64 (sd 0.5/64) and the metric ranks it in reverse (rho -1); rate
    1e-3: the metric ranks the runs exactly (rho +1). Weighted by runs the first reading is (6 * -1 + 6 * 1) / 12 = 0;
    without 1e-5 it is 1."""
    from pti_plugin.protocol.internal_metrics import INDEPENDENT, summarise, summary_lines

    rows = []
    for k in range(6):
        low = (21 + k % 2) / 64
        rows.append({"run": f"h3-none-lr1e-05-seed{k % 3}-abc", INDEPENDENT: low, "gt_leakage": low,
                     "attention_leakage": 1.0 - low})
        high = 0.3 + 0.1 * k
        rows.append({"run": f"h3-none-lr0.001-seed{k % 3}-abc", INDEPENDENT: high, "gt_leakage": high,
                     "attention_leakage": high})
    summary = summarise(rows, draws=30)
    entry = next(c for c in summary["correlations"]
                 if (c["internal"], c["ground_truth"]) == ("attention_leakage", INDEPENDENT))
    assert entry["within_lr"]["spearman"] == pytest.approx(0.0, abs=1e-12) and entry["within_lr"]["groups"] == 2
    assert entry["within_varying_lr"]["spearman"] == pytest.approx(1.0)
    assert entry["within_varying_lr"]["groups"] == 1 and entry["within_varying_lr"]["n"] == 6
    assert summary["varying_rates"] == {"kept": [0.001], "left_out": [1e-05], "min_truth_sd": 1 / 64}
    text = "\n".join(summary_lines(summary))
    assert "the same, rates where the truth varies [95%]" in text and "left out: lr 1e-05" in text
    assert "| 1.00 [" in text.split("`attention_leakage` | heatmaps, neutral prompts (what the real-model path "
                                    "reports) | `h3_training_cell_fraction`")[1].split("\n")[0]


# --- the position band's resolution and plot -----------------------------------------------------------------------
def _band_record() -> dict:
    """The committed band's curve: switch points 80 timesteps apart, share 0 at 939, 57/96 at 859, 91/96 at 779."""
    t = [999.0, 939.0, 859.0, 779.0, 699.0, 619.0]
    counts = [(0, 96), (0, 96), (57, 96), (91, 96), (96, 96), (96, 96)]
    rows = [{"prompt_a": "a red circle at the top left", "prompt_b": "a red circle at the bottom right",
             "switch_step": 2 * k, "in_a": a, "in_b": n - a, "images": n} for k, (a, n) in enumerate(counts)]
    return {"settings": {"seeds": 32, "sample_steps": 25, "guidance": 3.0, "switch_every": 2},
            "switch_timesteps": t, "share_first_cell": [a / n for a, n in counts],
            "t_high": 925.5, "t_low": 789.8, "regulariser_coverage": 0.1357, "rows": rows}


def test_band_line_states_the_switch_points_each_end_was_interpolated_between(tmp_path):
    from pti_plugin.protocol.protocol_sections import timestep_lines

    (tmp_path / "position_timesteps.json").write_text(json.dumps(_band_record()))
    line = timestep_lines(tmp_path)[1]
    assert "between timesteps 926 and 790 by linear interpolation" in line
    assert "(0.00 at 939, 0.59 at 859, 0.95 at 779)" in line
    assert "crosses 0.1 between timesteps 939 and 859 and 0.9 between 859 and 779" in line
    assert "14% of them fall in that band by the interpolated ends (between 0% and 16% by the switch points alone)" in line


def test_band_plot_is_redrawn_from_its_record_with_wilson_intervals_and_a_whole_legend(tmp_path, monkeypatch):
    """``--replot`` draws the committed record's plot without the model; the legend said "14% of training t"
    (cut off) and the points had no interval."""
    import matplotlib.pyplot as plt

    (tmp_path / "position_timesteps.json").write_text(json.dumps(_band_record()))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    runpy.run_path(str(REPO / "analysis" / "position_timesteps.py"), run_name="replot_under_test")["main"](
        ["--out", str(tmp_path), "--replot"])
    assert (tmp_path / "position_timesteps.png").stat().st_size > 0
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.endswith("14% of the uniform training timesteps") for label in labels)
    assert any("0% to 16%" in label for label in labels)
    caps = sorted(y for line in ax.lines if line.get_marker() == "_" for y in line.get_ydata())
    z = 1.959963985  # the normal's 97.5% point; Wilson's 95% interval for 57 of 96:
    centre, half = (57 + z ** 2 / 2) / (96 + z ** 2), z * np.sqrt(57 * 39 / 96 + z ** 2 / 4) / (96 + z ** 2)
    assert min(caps, key=lambda y: abs(y - (centre - half))) == pytest.approx(centre - half, abs=1e-6)
    assert min(caps, key=lambda y: abs(y - (centre + half))) == pytest.approx(centre + half, abs=1e-6)
    plt.close(figures[0])
