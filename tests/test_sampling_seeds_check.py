"""More sampling seeds against fewer on the same runs (analysis/sampling_seeds_check.py)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from pti_plugin.metrics.correlation import paired_spearman_difference

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "sampling_seeds_check.py"


def _main(argv: list[str]) -> int:
    return runpy.run_path(str(SCRIPT), run_name="sampling_seeds_check_under_test")["main"](argv)


def test_a_less_noisy_measurement_of_the_same_runs_correlates_better_and_the_interval_says_so():
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=60)
    noisy, clean = truth + rng.normal(0, 0.5, 60), truth + rng.normal(0, 0.05, 60)
    out = paired_spearman_difference(noisy, truth, clean, truth, draws=500)
    assert out["n"] == 60 and out["more"] > 0.95 and out["fewer"] < 0.7
    assert out["difference"] == pytest.approx(out["more"] - out["fewer"])
    assert 0 < out["difference_lo"] <= out["difference"] <= out["difference_hi"]
    swapped = paired_spearman_difference(clean, truth, noisy, truth, draws=500)
    assert swapped["difference_hi"] < 0
    same = paired_spearman_difference(noisy, truth, noisy, truth, draws=200)  # the same runs resampled on both sides
    assert same["difference"] == 0 and same["difference_lo"] == 0 and same["difference_hi"] == 0


def test_only_runs_finite_on_both_sides_count():
    x = [0.1, 0.2, 0.3, 0.4, None, 0.6]
    y = [1.0, 2.0, 3.0, 4.0, 5.0, float("nan")]
    out = paired_spearman_difference(x, y, [0.4, 0.3, 0.2, 0.1, 0.5, 0.6], y, draws=50)
    assert out["n"] == 4 and out["fewer"] == pytest.approx(1.0) and out["more"] == pytest.approx(-1.0)


def _summary(path: Path, seeds: int, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seeds": seeds, "rows": rows}))
    return path


def test_script_compares_the_runs_both_files_score(tmp_path, capsys):
    """With 16 seeds the attention leakage ranks the runs against the independent truth in reverse, with
    64 exactly as it does; a run only one file has is left out."""
    truth = [0.3, 0.5, 0.4, 0.8, 0.6]
    runs = [f"h3-none-lr0.001-seed{k}-abc" for k in range(5)]
    fewer = [{"run": r, "h3_training_cell_fraction": t, "gt_leakage": t, "gt_training_cell_fraction": t,
              "attention_leakage": -t, "attention_leakage_band": t, "heatmap_neutral_attraction_only": t}
             for r, t in zip(runs, truth)]  # band: one side only
    more = [{"run": r, "h3_training_cell_fraction": t, "gt_leakage": t, "gt_training_cell_fraction": t,
             "attention_leakage": t, "heatmap_neutral_attraction_only": t} for r, t in zip(runs, truth)]
    more.append({"run": "only-here", "h3_training_cell_fraction": 0.9, "gt_leakage": 0.0, "attention_leakage": 0.0})
    a, b = _summary(tmp_path / "a" / "internal_metrics.json", 16, fewer), _summary(tmp_path / "b" / "i.json", 64, more)
    assert _main([str(a), str(b), "--out", str(tmp_path / "out"), "--draws", "100"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("attention_leakage_vs_independent Spearman rho: fewer=-1.000 (16 seeds) more=1.000 (64 seeds) "
                           "difference=2.000 95% lo=")
    assert last.endswith("runs=5")
    saved = json.loads((tmp_path / "out" / "sampling_seeds.json").read_text())
    assert saved["seeds"] == [16, 64] and "only-here" not in saved["runs"]
    assert [(e["internal"], e["ground_truth"]) for e in saved["entries"][:2]] == [
        ("gt_leakage", "h3_training_cell_fraction"), ("gt_training_cell_fraction", "h3_training_cell_fraction")]
    table = (tmp_path / "out" / "sampling_seeds.md").read_text()
    assert "| attention_leakage | h3_training_cell_fraction | −1.00 | 1.00 | 2.00 [" in table
    assert all(e["internal"] != "attention_leakage_band" for e in saved["entries"])
    pairs = [(e["internal"], e["ground_truth"]) for e in saved["entries"]]
    assert len(pairs) == len(set(pairs)) == 2 + 2 * 2  # the ceilings, then two versions against two truths


def test_script_names_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _main([str(tmp_path / "nope.json"), str(tmp_path / "nope2.json"), "--out", str(tmp_path)])
    assert "nope.json" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("not json", "not JSON"), ("{}", "not an internal_metrics.json (no 'rows' list)"),
                                           ("[1, 2]", "not an internal_metrics.json")])
def test_script_names_a_file_that_is_no_summary(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(SystemExit) as stop:
        _main([str(bad), str(bad), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and f"{bad}: {message}" in capsys.readouterr().err


def test_script_names_an_out_that_is_a_file(tmp_path, capsys):
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        _main([str(summary), str(summary), "--out", str(summary)])
    assert f"--out {summary}: exists and is not a folder" in capsys.readouterr().err
