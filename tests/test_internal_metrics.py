"""Rank correlation of the model-internal metrics with the toy world's ground truth (analysis/internal_metrics.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pti_plugin.metrics.correlation import correlation_interval

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("internal_metrics_script", ROOT / "analysis" / "internal_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_interval_is_one_for_a_monotone_relation_and_covers_zero_for_noise():
    x = np.linspace(0.0, 1.0, 30)
    exact = correlation_interval(x, np.exp(3 * x), draws=300)
    assert exact["spearman"] == pytest.approx(1.0) and exact["spearman_lo"] == pytest.approx(1.0)
    reversed_ = correlation_interval(x, -x ** 3, draws=300)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["spearman_hi"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noise = correlation_interval(rng.normal(size=200), rng.normal(size=200), draws=300)
    assert noise["spearman_lo"] < 0 < noise["spearman_hi"] and noise["n"] == 200
    few = correlation_interval([1.0, 2.0], [1.0, None], draws=10)
    assert few["n"] == 1 and np.isnan(few["spearman_lo"])


def _fake_runs(folder: Path, script) -> None:
    """Finished runs whose cached scores (the settings the script asks for) make the answer known: the
    heatmap leakage ranks runs as the ground truth does, the centroid one in reverse."""
    from pti_plugin.toy_world.run_scores import SCORES_FILE, SCORES_VERSION, score_settings
    from pti_plugin.protocol.internal_metrics import BAND_FILE

    folder.mkdir()
    args = script.parse_args([str(folder)])
    settings = {"version": SCORES_VERSION} | score_settings(args).as_dict()
    for k in range(8):
        run = folder / f"h3-none-lr0.00{k + 1}-seed42-abc"
        run.mkdir()
        (run / "premise.safetensors").write_bytes(b"")
        truth = 0.1 * k
        scores = {"gt_leakage": truth, "gt_training_cell_fraction": 0.3 + truth, "attention_leakage": truth ** 2,
                  "centroid_neutral_leakage_score": -truth, "proxy_denoise_mse": 1.0 - truth,
                  "gt_reconstruction": truth, "gt_character_match": truth}
        (run / SCORES_FILE).write_text(json.dumps({"settings": settings, "scores": scores}))
        band = {"band": [780, 930], "seeds": args.seeds, "steps": args.sample_steps, "guidance": args.guidance}
        (run / BAND_FILE).write_text(json.dumps({"settings": band, "scores": {"attention_leakage_band": -truth}}))
        parts = folder.parent / "parts"  # the H3 part of the run: an independent training-cell fraction, k/10
        parts.mkdir(exist_ok=True)
        (parts / f"{run.name.rsplit('-', 1)[0]}.json").write_text(
            json.dumps({"in_training_cell": [1] * k + [0] * (10 - k) + [None]}))
    (folder / "unfinished").mkdir()  # no premise.safetensors: not a run


def test_cached_scores_give_each_metric_its_rank_correlation(tmp_path, capsys):
    script = _script()
    runs = tmp_path / "runs"
    _fake_runs(runs, script)
    assert script.main([str(runs), "--out", str(tmp_path / "out"), "--draws", "200"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        "attention_leakage_spearman=1.000 lo=1.000 hi=1.000 runs=8"
    summary = json.loads((tmp_path / "out" / "internal_metrics.json").read_text())
    by = {(c["internal"], c["ground_truth"]): c for c in summary["correlations"]}
    assert by[("attention_leakage", "gt_training_cell_fraction")]["meets_target"]
    assert by[("centroid_neutral_leakage_score", "gt_leakage")]["spearman"] == pytest.approx(-1.0)
    assert not by[("centroid_neutral_leakage_score", "gt_leakage")]["meets_target"]
    assert by[("proxy_denoise_mse", "gt_reconstruction")]["spearman"] == pytest.approx(-1.0)
    assert by[("attention_leakage_band", "gt_leakage")]["spearman"] == pytest.approx(-1.0)  # from the band caches
    reliability = by[("gt_leakage", "h3_training_cell_fraction")]  # the parts beside the runs folder
    assert reliability["spearman"] == pytest.approx(1.0) and reliability["n"] == 8 and "ceiling" in reliability["version"]
    assert by[("heatmap_all_leakage_score", "gt_leakage")]["n"] == 0  # not in these scores: listed, not dropped
    assert set(summary["rows"][0]) >= {"run", "attention_leakage", "gt_leakage"} and len(summary["rows"]) == 8
    from pti_plugin.protocol.internal_metrics import verdict
    assert "Spearman 1.00 [1.00, 1.00] over 8 runs; it meets the target 0.8" in verdict(summary)
    table = (tmp_path / "out" / "internal_metrics.md").read_text()
    assert "| `attention_leakage` |" in table and "1.00 [1.00, 1.00]" in table


def test_shards_split_the_runs_and_bad_input_is_named(tmp_path, capsys):
    script = _script()
    runs = tmp_path / "runs"
    _fake_runs(runs, script)
    from pti_plugin.protocol.internal_metrics import find_runs, score_runs

    found = find_runs([runs], "premise")
    args = script.parse_args([str(runs)])
    halves = [score_runs(found, "premise", args, (k, 2), log=lambda text: None) for k in (0, 1)]
    assert sorted(r["run"] for half in halves for r in half) == [r.name for r in found] and len(halves[0]) == 4
    with pytest.raises(SystemExit):
        script.parse_args([str(runs), "--shard", "2/2"])
    assert "--shard 2/2: need 0 <= K < N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args([str(tmp_path / "missing")])
    assert "not a folder" in capsys.readouterr().err


def test_verdict_reads_the_target_off_the_interval():
    from pti_plugin.protocol.internal_metrics import verdict

    def summary(lo, estimate, hi):
        return {"target": 0.8, "correlations": [{"internal": "attention_leakage", "ground_truth": "gt_leakage",
                                                 "spearman": estimate, "spearman_lo": lo, "spearman_hi": hi, "n": 50}]}

    assert "it does not meet the target 0.8 (its interval lies below it)" in verdict(summary(0.4, 0.6, 0.75))
    assert "it may meet the target 0.8 (its interval reaches it)" in verdict(summary(0.6, 0.75, 0.85))
    assert "it meets the target 0.8" in verdict(summary(0.82, 0.9, 0.95))


def test_cached_only_summarises_the_scored_runs_and_computes_nothing(tmp_path, capsys):
    script = _script()
    runs = tmp_path / "runs"
    _fake_runs(runs, script)
    unscored = runs / "h3-none-lr0.02-seed42-abc"  # finished, never scored: scoring its empty file would fail
    unscored.mkdir()
    (unscored / "premise.safetensors").write_bytes(b"")
    assert script.main([str(runs), "--out", str(tmp_path / "out"), "--draws", "50", "--cached_only"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("runs=8")
    with pytest.raises(SystemExit):
        script.parse_args([str(runs), "--cached_only", "--score_only"])


def test_each_half_of_the_leakage_score_is_a_version_and_the_half_that_carries_the_truth_ranks_with_it(tmp_path):
    """Runs whose leakage lies only in the attraction ratio (the diversity ratio is noise): the attraction-only
    version ranks them as the truth does, the diversity-only version does not."""
    from pti_plugin.protocol.internal_metrics import LEAKAGE_VERSIONS, component_scores, summarise

    rng = np.random.default_rng(1)
    rows = []
    for k in range(40):
        truth = k / 40
        ratios = {"heatmap_neutral_attraction_ratio": 1.0 - truth, "heatmap_neutral_diversity_ratio": rng.uniform(0.2, 1.0)}
        rows.append({"run": f"r{k}", "gt_leakage": truth} | ratios | component_scores(ratios))
    by = {(c["internal"], c["ground_truth"]): c for c in summarise(rows, draws=200)["correlations"]}
    assert by[("heatmap_neutral_attraction_only", "gt_leakage")]["spearman"] == pytest.approx(1.0)
    diversity = by[("heatmap_neutral_diversity_only", "gt_leakage")]
    assert diversity["spearman_lo"] < 0 < diversity["spearman_hi"] and diversity["n"] == 40
    assert by[("centroid_neutral_attraction_only", "gt_leakage")]["n"] == 0  # listed though not computed
    assert "attraction to the training images" in LEAKAGE_VERSIONS["heatmap_neutral_attraction_only"]


def test_within_a_learning_rate_the_agreement_that_comes_from_the_rates_alone_is_left_out():
    """Runs at 4 rates: the rate sets most of both the metric and the truth. A metric that follows the
    rate but not the runs inside it ranks well pooled and not at all within a rate; one that follows
    the truth inside each rate ranks well both ways."""
    from pti_plugin.protocol.internal_metrics import run_learning_rate, summarise

    rng = np.random.default_rng(3)
    rows = []
    for level, lr in enumerate(("1e-05", "0.0001", "0.001", "0.003")):
        for k in range(12):
            truth = level + rng.normal(0, 0.3)
            rows.append({"run": f"h3-none-lr{lr}-seed{k}-abc123", "gt_leakage": truth,
                         "attention_leakage": level + rng.normal(0, 0.3),  # the rate only
                         "attention_leakage_band": truth + rng.normal(0, 0.05)})  # the run itself
    by = {(c["internal"], c["ground_truth"]): c for c in summarise(rows, draws=300)["correlations"]}
    rate_only = by[("attention_leakage", "gt_leakage")]
    assert rate_only["spearman"] > 0.7  # pooled, the rates alone give a high rho
    within = rate_only["within_lr"]
    assert within["groups"] == 4 and within["n"] == 48
    assert within["spearman_lo"] < 0 < within["spearman_hi"]
    follows = by[("attention_leakage_band", "gt_leakage")]["within_lr"]
    assert follows["spearman_lo"] > 0.8
    assert follows["spearman_lo"] <= follows["spearman"] <= follows["spearman_hi"]
    assert run_learning_rate("h3-half_angle-w100-lr1e-05-seed3-0f9a") == 1e-5
    assert run_learning_rate("lora-run") is None


def test_within_group_spearman_skips_groups_it_cannot_rank():
    from pti_plugin.metrics.correlation import within_group_spearman

    # group "a": perfectly ranked; "b": the truth is constant (no rho); "c": two pairs only; None: left out
    x = [1, 2, 3, 4, 1, 2, 3, 1, 2, 9]
    y = [1, 2, 3, 4, 5, 5, 5, 2, 1, 0]
    groups = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + [None]
    out = within_group_spearman(x, y, groups, draws=100)
    assert out["groups"] == 1 and out["n"] == 4 and out["spearman"] == pytest.approx(1.0)
    assert np.isnan(within_group_spearman([1, 2], [2, 1], ["a", "a"], draws=10)["spearman"])


def test_per_rate_breakdown_shows_where_the_metric_ranks_runs():
    """At lr 1e-3 the metric follows the independent truth, at 1e-4 it is noise: the breakdown says so,
    with the truth's spread beside each rate."""
    from pti_plugin.protocol.internal_metrics import INDEPENDENT, summarise, summary_lines

    rng = np.random.default_rng(5)
    rows = []
    for lr, follows in (("0.0001", False), ("0.001", True)):
        for k in range(20):
            truth = rng.uniform(0.2, 0.8)
            metric = truth + rng.normal(0, 0.02) if follows else rng.uniform(0, 1)
            rows.append({"run": f"h3-half_angle-w10-lr{lr}-seed{k}-d1g3st", INDEPENDENT: truth,
                         "gt_leakage": truth, "attention_leakage": metric})
    summary = summarise(rows, draws=300)
    by = {(c["lr"], c["internal"]): c for c in summary["per_rate"]}
    assert by[(1e-3, "attention_leakage")]["spearman_lo"] > 0.8 and by[(1e-3, "attention_leakage")]["n"] == 20
    noise = by[(1e-4, "attention_leakage")]
    assert noise["spearman_lo"] < 0 < noise["spearman_hi"]
    assert by[(1e-4, "gt_leakage")]["spearman"] == pytest.approx(1.0)  # the ceiling pair: truth against itself here
    assert 0.1 < noise["truth_sd"] < 0.25  # a uniform on [0.2, 0.8] has sd 0.17
    assert any(line.startswith("| 0.001 | `attention_leakage`") for line in summary_lines(summary))


def test_runs_scored_earlier_stay_in_the_summary_when_their_folder_is_gone(tmp_path, capsys):
    import shutil

    script = _script()
    runs, out = tmp_path / "runs", tmp_path / "out"
    _fake_runs(runs, script)
    assert script.main([str(runs), "--out", str(out), "--draws", "50"]) == 0
    before = json.loads((out / "internal_metrics.json").read_text())
    lost = sorted(p for p in runs.iterdir() if (p / "premise.safetensors").is_file())[:3]
    for run in lost:
        shutil.rmtree(run)
    assert script.main([str(runs), "--out", str(out), "--draws", "50"]) == 0
    printed = capsys.readouterr().out
    assert "kept 3 runs scored earlier" in printed and printed.strip().endswith("runs=8")
    after = json.loads((out / "internal_metrics.json").read_text())
    assert sorted(after["rows"], key=lambda r: r["run"]) == sorted(before["rows"], key=lambda r: r["run"])
    with pytest.raises(SystemExit, match="--seeds 16"):  # rows scored with 16 seeds are not mixed with 8
        script.main([str(runs), "--out", str(out), "--draws", "50", "--seeds", "8"])
    assert script.main([str(runs), "--out", str(out), "--draws", "50", "--replace"]) == 0
    assert capsys.readouterr().out.strip().endswith("runs=5")


def test_copies_within_a_training_seed_add_no_evidence_when_seeds_are_resampled():
    """Runs of one training seed that barely differ (lr 1e-5: the pivot plus noise) are one observation,
    not ten. Resampling training seeds, ten copies of each seed's run give exactly the interval of the
    distinct runs (Spearman is invariant to duplicating every point alike); resampling runs, the copies
    make a noisy 5-point relation look decided."""
    from pti_plugin.metrics.correlation import correlation_interval, within_group_spearman

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=5), rng.normal(size=5)  # one run per training seed, no real relation
    seeds = [42, 1, 2, 3, 4]
    copies = 10
    x10, y10, seeds10 = np.repeat(x, copies), np.repeat(y, copies), np.repeat(seeds, copies).tolist()
    distinct = correlation_interval(x, y, draws=400, clusters=seeds)
    clustered = correlation_interval(x10, y10, draws=400, clusters=seeds10)
    assert (clustered["spearman_lo"], clustered["spearman_hi"]) == \
        pytest.approx((distinct["spearman_lo"], distinct["spearman_hi"]), abs=1e-12)
    own = correlation_interval(x, y, draws=400)  # every pair its own cluster: the run-level bootstrap
    assert (own["spearman_lo"], own["spearman_hi"]) == (distinct["spearman_lo"], distinct["spearman_hi"])
    runs = correlation_interval(x10, y10, draws=400)
    assert runs["spearman_hi"] - runs["spearman_lo"] < 0.6 * (clustered["spearman_hi"] - clustered["spearman_lo"])

    # the same inside learning rates: 5 seeds x 2 rates, each run copied within its seed
    xs, ys = rng.normal(size=10), rng.normal(size=10)
    rates, seed_of = [1e-5] * 5 + [1e-3] * 5, seeds * 2
    base = within_group_spearman(xs, ys, rates, draws=300, clusters=seed_of)
    dup = within_group_spearman(np.repeat(xs, 4), np.repeat(ys, 4), np.repeat(rates, 4).tolist(), draws=300,
                                clusters=np.repeat(seed_of, 4).tolist())
    assert dup["spearman"] == pytest.approx(base["spearman"], abs=1e-12)
    assert (dup["spearman_lo"], dup["spearman_hi"]) == pytest.approx((base["spearman_lo"], base["spearman_hi"]), abs=1e-12)


def test_a_resolution_that_carries_the_truth_beats_all_layers_on_the_same_runs():
    """Two rates whose runs differ in leakage: the all-layer leakage follows the rate only, the 4x4 layers
    follow the independent truth inside each rate and the 16x16 ones are noise. Pooled, the rate alone
    makes all layers look good; within a rate the paired comparison says which version ranks the runs; a
    version no run carries is listed with no runs; a run without layer scores is left out of the comparison."""
    from pti_plugin.protocol.internal_metrics import INDEPENDENT, LAYER_TRUTHS, summarise, summary_lines

    rng = np.random.default_rng(8)
    rows = []
    for level, lr in enumerate(("0.0001", "0.001")):
        for k in range(24):
            truth = level + rng.uniform(0.2, 0.8)
            rows.append({"run": f"h3-uniform_half-w100-lr{lr}-seed{1 + k % 2}-d1g3st", INDEPENDENT: truth, "gt_leakage": truth,
                         "attention_leakage": level + rng.uniform(0, 1), "attention_leakage_4x4": truth + rng.normal(0, 0.02),
                         "attention_leakage_16x16": rng.uniform(0, 1)})
    rows.append({"run": "h3-none-lr0.001-seed99-d1g3st", INDEPENDENT: 0.5, "gt_leakage": 0.5, "attention_leakage": 0.3})
    summary = summarise(rows, draws=300)
    runs = {c["internal"]: c["n"] for c in summary["correlations"] if c["ground_truth"] == INDEPENDENT}
    assert runs["attention_leakage_4x4"] == runs["attention_leakage_16x16"] == 48 and runs["attention_leakage_2x2"] == 0
    by = {(c["version"], c["ground_truth"], c["lr"]): c for c in summary["layer_versions"]}
    assert set(by) == {(v, truth, lr) for v in ("attention_leakage_16x16", "attention_leakage_4x4")
                       for truth in LAYER_TRUTHS for lr in ("all", "within", 1e-4, 1e-3, "seed 1", "seed 2",
                                                            "condition uniform_half-w100", "above 0.0001")}
    assert by[("attention_leakage_4x4", INDEPENDENT, "seed 1")]["n"] == 24  # runs k % 2 == 1, at both rates
    pooled = by[("attention_leakage_4x4", INDEPENDENT, "all")]
    assert pooled["all_layers"] > 0.6 and pooled["rho"] > 0.9  # the rates alone make all layers rank well pooled
    within = by[("attention_leakage_4x4", INDEPENDENT, "within")]
    assert within["n"] == 48 and within["rho"] > 0.9 and abs(within["all_layers"]) < 0.4 and within["difference_lo"] > 0.5
    assert within["difference_lo"] <= within["difference"] <= within["difference_hi"]
    assert by[("attention_leakage_4x4", INDEPENDENT, 1e-3)]["n"] == 24
    noise = by[("attention_leakage_16x16", INDEPENDENT, "within")]
    assert noise["difference_lo"] < 0 < noise["difference_hi"]
    assert any(line.startswith("| `attention_leakage_4x4` | `h3_training_cell_fraction` | within | 48 |")
               for line in summary_lines(summary))


def test_the_report_shows_each_committed_layer_comparison(tmp_path):
    """A results folder with the main summary and two ``--layers`` summaries: the report's internal-metrics
    section carries the main table and one resolution block per layer summary, with its runs and seeds."""
    from pti_plugin.protocol.internal_metrics import INDEPENDENT, summarise
    from pti_plugin.protocol.protocol_sections import internal_metrics_section

    rng = np.random.default_rng(2)
    rows = []
    for k in range(12):
        truth = rng.uniform(0, 1)
        rows.append({"run": f"h3-none-lr0.001-seed{k % 3}-abc", INDEPENDENT: truth, "gt_leakage": truth,
                     "attention_leakage": rng.uniform(0, 1), "attention_leakage_16x16": truth})
    main = summarise([{k: v for k, v in row.items() if k != "attention_leakage_16x16"} for row in rows], draws=50)
    (tmp_path / "internal_metrics.json").write_text(json.dumps(main | {"seeds": 16}))
    for folder, seeds in (("attention_layers", 16), ("attention_layers/seeds64_lr1e-3", 64)):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "internal_metrics.json").write_text(json.dumps(summarise(rows, draws=50) | {"seeds": seeds}))
    test_rows = [row | {"run": row["run"].replace(f"-seed{k % 3}-", f"-seed{(42, 1, 2)[k % 3]}-")}
                 for k, row in enumerate(rows)]  # the stated test's training seeds, scored --layers_only
    (tmp_path / "attention_layers" / "test").mkdir()
    (tmp_path / "attention_layers" / "test" / "internal_metrics.json").write_text(
        json.dumps(summarise(test_rows, draws=50) | {"seeds": 16, "rows": test_rows, "layers_only": True}))
    replication_rows = [row | {"run": f"h3-uniform_half-w10-lr0.001-seed{(5, 6, 7)[k % 3]}-abc"}
                        for k, row in enumerate(rows)]  # the stated replication's seeds and one of its conditions
    (tmp_path / "attention_layers" / "zreplication").mkdir()
    (tmp_path / "attention_layers" / "zreplication" / "internal_metrics.json").write_text(
        json.dumps(summarise(replication_rows, draws=50) | {"seeds": 16, "rows": replication_rows, "layers_only": True}))
    lines = internal_metrics_section(tmp_path)["lines"]
    blocks = [line for line in lines if line.startswith("**By UNet resolution")]
    assert [b.split("`")[1] for b in blocks] == ["attention_layers", "attention_layers/seeds64_lr1e-3",
                                                 "attention_layers/test", "attention_layers/zreplication"]
    assert "12 runs scored with 64 sampling seeds" in blocks[1]
    assert [b.split(" (")[0] for b in blocks] == (["**By UNet resolution, exploratory**"] * 2 + ["**By UNet resolution, the stated test**",
                                                   "**By UNet resolution, the stated replication**"])
    assert blocks[0].endswith("--layers`):") and blocks[2].endswith("--layers_only`):")
    assert sum(line.startswith("| `attention_leakage_16x16` | `h3_training_cell_fraction` | all | 12 |") for line in lines) == 4
    assert any("(the stated replication's runs, 12 of 45)" in line for line in lines)
    before = lines[:lines.index(blocks[0])]  # the main summary's runs carry no layer versions: no comparison there
    assert any(line.startswith("Command:") for line in before) and not any(line.startswith("| version | against |") for line in before)


@pytest.mark.parametrize("follows, reading", [(1.0, "supported"), (0.0, "inconclusive"), (-1.0, "refuted")])
def test_the_stated_layer_test_reads_its_rule_off_the_interval(follows, reading):
    """16x16 following the independent truth, noise, or its reverse, against an all-layer leakage that is noise:
    supported, inconclusive, refuted; the reading says whether the runs are the test's training seeds."""
    from pti_plugin.protocol.internal_metrics import INDEPENDENT, layer_test_verdict, summarise

    rng = np.random.default_rng(11)
    rows = []
    for k in range(60):
        truth = rng.uniform(0, 1)
        rows.append({"run": f"h3-none-lr0.001-seed{(42, 1, 2)[k % 3]}-abc", INDEPENDENT: truth, "gt_leakage": truth,
                     "attention_leakage": rng.uniform(0, 1),
                     "attention_leakage_16x16": follows * truth + rng.normal(0, 0.05) if follows else rng.uniform(0, 1)})
    summary = summarise(rows, draws=300)
    line = layer_test_verdict(summary | {"rows": rows})
    assert line.startswith(f"{reading}: attention_leakage_16x16 minus all layers") and line.endswith("(the stated test's runs, 60 of 51)")
    other = [row | {"run": row["run"].replace("-seed42-", "-seed3-")} for row in rows]
    assert "not a stated set of runs" in layer_test_verdict(summary | {"rows": other})
    assert layer_test_verdict({"layer_versions": []}) is None


@pytest.mark.parametrize("per_seed, reading, interval", [
    # mean 0.2167, sd 0.02887; t(2, 0.975) = 4.3027: half-width 0.0717
    ((0.20, 0.25, 0.20), "supported", "0.22 [0.14, 0.29]"),
    # mean 0.1333, sd 0.3889: half-width 0.966
    ((0.07, -0.22, 0.55), "inconclusive", "0.13 [-0.83, 1.10]"),
    # mean -0.3, sd 0.1: half-width 0.248
    ((-0.2, -0.3, -0.4), "refuted", "-0.30 [-0.55, -0.05]"),
])
def test_the_layer_tests_small_sample_check_reads_students_t_over_the_seeds(per_seed, reading, interval):
    """The small-sample check takes the 16x16-minus-all-layers difference of each training seed's runs against the
    independent truth, and only those: other versions, truths, the pooled and per-rate rows are left out."""
    from pti_plugin.protocol.internal_metrics import INDEPENDENT, layer_test_small_sample

    entry = lambda lr, d, version="attention_leakage_16x16", truth=INDEPENDENT: {  # noqa: E731
        "version": version, "ground_truth": truth, "lr": lr, "difference": d, "difference_lo": d, "difference_hi": d, "n": 17}
    entries = [entry(f"seed {s}", d) for s, d in zip((1, 2, 42), per_seed)]
    entries += [entry("all", 5.0), entry(0.001, -5.0), entry("seed 7", 9.0, version="attention_leakage_8x8"),
                entry("seed 7", 9.0, truth="gt_leakage"), entry("condition none", 9.0)]
    line = layer_test_small_sample({"layer_versions": entries})
    assert line == f"{reading}: the mean of 3 training seeds' differences {interval} (Student's t over the seeds)"
    assert layer_test_small_sample({"layer_versions": entries[:1] + entries[3:]}) is None  # one seed: no check


def test_an_out_that_is_a_file_is_refused_before_anything_is_scored(tmp_path, capsys):
    script = _script()
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path), "--out", str(taken)])
    assert stop.value.code == 2 and f"--out {taken}: exists and is not a folder" in capsys.readouterr().err
    assert taken.read_text() == "{}"


def test_a_stated_set_of_runs_is_known_by_its_training_seeds_and_conditions():
    """The test's seeds with its conditions, or the replication's with theirs, name that set; a seed or a
    condition outside it (even one the other set has) names none; a condition keeps its weight."""
    from pti_plugin.protocol.internal_metrics import run_condition, stated_layer_test

    def summary(cells):
        return {"rows": [{"run": f"h3-{c}-lr0.001-seed{s}-0123456789"} for c, s in cells]}

    assert run_condition("h3-class_endpoint-w10-lr0.001-seed5-0123456789") == "class_endpoint-w10"
    assert run_condition("h3-none-lr1e-05-seed42-0123456789") == "none"
    assert run_condition("h1-lr2.75e-05-seed5-0123456789") is None
    test = [(c, s) for c in ("none", "half_angle-w10", "reg_images-w1") for s in (42, 1, 2)]
    replication = [(c, s) for c in ("class_endpoint-w10", "uniform_half-w10", "half_angle_band-w10") for s in (5, 6, 7)]
    assert stated_layer_test(summary(test)) == "the stated test"
    assert stated_layer_test(summary(test[:2])) is None  # seed 2 missing: not the test's seeds
    assert stated_layer_test(summary(replication)) == "the stated replication"
    assert stated_layer_test(summary(replication[:3])) == "the stated replication"  # one condition, all seeds: partial
    assert stated_layer_test(summary(replication + [("half_angle_band-w100", 5)])) is None
    assert stated_layer_test(summary(replication + [("none", 5)])) is None  # the test's condition, the replication's seed
    assert stated_layer_test(summary([(c, {5: 42, 6: 1, 7: 2}[s]) for c, s in replication])) is None
    assert stated_layer_test({"rows": []}) is None


def test_layer_comparison_reads_each_condition_and_the_runs_above_the_lowest_rate():
    """16x16 tracks the truth only in the lowest rate's runs and only in one condition, where all layers are
    noise; elsewhere both are the same numbers: above the lowest rate, and in the other condition, the
    difference is exactly 0 over exactly those runs, while it is positive in the tracking condition."""
    from pti_plugin.protocol.internal_metrics import INDEPENDENT, layer_comparison, run_learning_rate

    rng = np.random.default_rng(4)
    rows = []
    for condition in ("uniform_half-w10", "class_endpoint-w10"):
        for lr in (1e-5, 1e-3, 3e-3):
            for k in range(12):
                truth, noise = rng.uniform(0, 1), rng.uniform(0, 1)
                tracks = lr == 1e-5 and condition == "uniform_half-w10"
                rows.append({"run": f"h3-{condition}-lr{lr:g}-seed{(5, 6, 7)[k % 3]}-0123456789", INDEPENDENT: truth,
                             "attention_leakage": noise, "attention_leakage_16x16": truth if tracks else noise})
    entries = {c["lr"]: c for c in layer_comparison(rows, [run_learning_rate(r["run"]) for r in rows], draws=200)
               if c["version"] == "attention_leakage_16x16" and c["ground_truth"] == INDEPENDENT}
    assert entries["above 1e-05"]["n"] == 48 and entries["above 1e-05"]["difference"] == 0
    assert entries["condition class_endpoint-w10"]["n"] == 36 and entries["condition class_endpoint-w10"]["difference"] == 0
    assert entries["condition uniform_half-w10"]["n"] == 36 and entries["condition uniform_half-w10"]["difference"] > 0.2
    assert entries["all"]["n"] == 72


def _run_with_layer_cache(folder: Path, name: str, scores: dict, seeds: int = 16) -> Path:
    """A finished run folder (its LoRA file a stub) whose layer scores are cached for ``seeds`` sampling seeds."""
    from pti_plugin.toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS  # the scorer's defaults

    run = folder / name
    run.mkdir(parents=True)
    (run / "premise.safetensors").write_bytes(b"stub")
    settings = {"seeds": seeds, "steps": SAMPLE_STEPS, "guidance": GUIDANCE}
    (run / "attention_layers.json").write_text(json.dumps({"settings": settings, "scores": scores}))
    return run


def test_layers_only_rows_carry_the_layer_sampling_and_the_independent_truth(tmp_path, capsys):
    """``--layers_only``: each run's row is its cached layer versions, the all-layer score of the same sampling
    as its ``attention_leakage``, and the independent truth of its H3 part; a cache written before the
    all-layer score was kept is no such cache; the summary has the layer comparison and the stated test's line."""
    from pti_plugin.protocol.internal_metrics import ALL_LAYERS, INDEPENDENT

    rng = np.random.default_rng(5)
    runs, parts = tmp_path / "h3" / "runs", tmp_path / "h3" / "parts"
    parts.mkdir(parents=True)
    expected = {}
    for k in range(9):
        cell = f"h3-none-lr{(1e-5, 1e-3, 1e-2)[k // 3]:g}-seed{(42, 1, 2)[k % 3]}"
        hits = rng.integers(0, 2, size=8).tolist()
        (parts / f"{cell}.json").write_text(json.dumps({"in_training_cell": hits + [None]}))
        truth, leak = sum(hits) / 8, rng.uniform(0, 1)
        _run_with_layer_cache(runs, f"{cell}-d{k}", {f"attention_leakage_{s}x{s}": truth + s for s in (16, 8, 4, 2)}
                              | {ALL_LAYERS: leak})
        expected[f"{cell}-d{k}"] = (truth, leak)
    _run_with_layer_cache(runs, "h3-none-lr0.003-seed42-old", {"attention_leakage_16x16": 0.5})  # an older cache
    out = tmp_path / "out"
    assert _script().main([str(runs), "--out", str(out), "--layers_only", "--cached_only", "--draws", "50"]) == 0
    written = json.loads((out / "internal_metrics.json").read_text())
    assert {r["run"] for r in written["rows"]} == set(expected) and written["layers_only"]  # the older cache is not read
    for row in written["rows"]:
        truth, leak = expected[row["run"]]
        assert row[INDEPENDENT] == truth and row["attention_leakage"] == leak and row["attention_leakage_16x16"] == truth + 16
        assert ALL_LAYERS not in row and row.get("gt_leakage") is None
    assert any(c["version"] == "attention_leakage_16x16" and c["lr"] == "all" for c in written["layer_versions"])
    assert "layer test: supported" in capsys.readouterr().out  # 16x16 is the truth plus a constant here
