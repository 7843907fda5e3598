"""Training seeds as the unit of replication: every sweep point trained N times with seed + k, in its own
run folder, resumable and extendable; the report's seed means and their intervals (lr sweep and bench)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import toml
import torch
from safetensors.torch import load_file

from pti_plugin.metrics.replication import seed_level_interval
from pti_plugin.sweeps import bench, bench_report, lr_sweep, plan, seeds

INTERVAL = re.compile(r"\d \[-?\d")  # "0.53 [0.41, 0.66]"


def _preset(tiny_model, tiny_dataset, root: Path, **extra) -> Path:
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(root / "unused"), "train_batch_size": 2, "max_train_steps": 1, "network_dim": 4,
           "network_alpha": 4.0, "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2},
                                            {"name": "lora", "kind": "lora", "learning_rate": 2e-2}]} | extra
    path = root / "p.toml"
    path.write_text(toml.dumps(raw))
    return path


def _sweep(argv: list[str]) -> tuple[list[dict], str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rows = lr_sweep.main(argv)
    return rows, buffer.getvalue()


# --- the option -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-2", "two"])
@pytest.mark.parametrize("parse", [lambda extra: lr_sweep.parse_args(["--preset", "p", "--stage", "lora", "--lrs", "1e-3",
                                                                      *extra]),
                                   bench.parse_args], ids=["lr_sweep", "bench"])
def test_training_seeds_below_one_are_refused_naming_the_option(parse, value, capsys):
    with pytest.raises(SystemExit):
        parse(["--training_seeds", value])
    assert "argument --training_seeds" in capsys.readouterr().err
    assert parse(["--training_seeds", "3"]).training_seeds == 3


# --- planning ---------------------------------------------------------------------------------------


def test_each_training_seed_has_its_own_run_seed_and_pivot(tiny_model, tiny_dataset, tmp_path):
    preset = _preset(tiny_model, tiny_dataset, tmp_path, seed=7)
    raw = toml.load(preset)
    base = ["--preset", str(preset), "--stage", "lora", "--lrs", "1e-3,1e-2", "--steps", "2", "--out", str(tmp_path / "s")]
    args = lr_sweep.parse_args(base + ["--training_seeds", "3"])
    pivots = {k: plan.plan_pivot(args, raw, k) for k in range(3)}
    assert [p.run_dir.name for p in pivots.values()] == ["pivot", "pivot-s1", "pivot-s2"]
    assert [toml.load(p.preset_path)["seed"] for p in pivots.values()] == [7, 8, 9]
    specs = plan.plan_runs(args, raw, pivots)
    assert [s.name for s in specs] == ["lora-lr0.001", "lora-lr0.001-s1", "lora-lr0.001-s2",
                                       "lora-lr0.01", "lora-lr0.01-s1", "lora-lr0.01-s2"]
    for spec in specs:  # seed k trains with the preset's seed + k, from pivot k
        derived = toml.load(spec.preset_path)
        assert derived["seed"] == 7 + spec.training_seed == spec.seed
        assert derived["weights"] == str(tmp_path / "s" / ("pivot" + seeds.seed_suffix(spec.training_seed)) / "tok1.safetensors")
    # --only_training_seed plans that seed alone, under the same names (the bench's per-seed LoRA sweeps)
    only = plan.plan_runs(lr_sweep.parse_args(base + ["--training_seeds", "3", "--only_training_seed", "2"]), raw, pivots)
    assert [s.name for s in only] == ["lora-lr0.001-s2", "lora-lr0.01-s2"]
    with pytest.raises(SystemExit, match="--only_training_seed 3"):
        plan.plan_runs(lr_sweep.parse_args(base + ["--training_seeds", "3", "--only_training_seed", "3"]), raw, pivots)
    # one training seed: the names of a sweep without seeds, and the preset's own seed (the default 42 here)
    del raw["seed"]
    args = lr_sweep.parse_args(base)
    specs = plan.plan_runs(args, raw, {0: plan.plan_pivot(args, raw)})
    assert [s.name for s in specs] == ["lora-lr0.001", "lora-lr0.01"] and {s.seed for s in specs} == {42}
    # the bench reads the run folders back under lr_sweep's names
    assert [d for _, _, d in bench.sweep_runs(tmp_path / "s", "lora", "1e-3,1e-2", 3)] == [
        tmp_path / "s" / "runs" / n for n in ("lora-lr0.001", "lora-lr0.001-s1", "lora-lr0.001-s2",
                                              "lora-lr0.01", "lora-lr0.01-s1", "lora-lr0.01-s2")]


# --- seed means and intervals -----------------------------------------------------------------------


def test_seed_means_average_each_point_and_bracket_its_runs():
    rows = [{"variant": "none", "lr": 1e-3, "training_seed": 0, "seed": 42, "gt_score": 0.40, "other": 2.0,
             "metric": "clip", "run_dir": "a"},
            {"variant": "none", "lr": 1e-3, "training_seed": 1, "seed": 43, "gt_score": 0.70, "other": 4.0,
             "metric": "clip", "run_dir": "b"},
            {"variant": "none", "lr": 1e-2, "training_seed": 0, "seed": 42, "gt_score": 0.9, "other": None},
            {"variant": "none", "lr": 1e-2, "training_seed": 1, "seed": 43, "gt_score": None, "other": None}]
    first, second = seeds.seed_means(rows, ("variant", "lr"), lambda key: key.startswith("gt_"))
    assert first["gt_score"] == pytest.approx(0.55) and first["other"] == pytest.approx(3.0)
    assert first["gt_score_lo"] <= 0.40 and first["gt_score_hi"] >= 0.70  # both runs inside the interval
    assert "other_lo" not in first and first["metric"] == "clip" and "run_dir" not in first
    assert first["training_seeds"] == [0, 1] and first["n_seeds"] == 2 and "seed" not in first
    # an unscored run does not count; a point without any value has none
    assert second["gt_score"] == second["gt_score_lo"] == second["gt_score_hi"] == 0.9 and second["n_seeds"] == 1
    assert second["other"] is None


def test_format_interval():
    assert seeds.format_interval(0.531, 0.409, 0.6612) == "0.53 [0.41, 0.66]"
    assert seeds.format_interval(0.5, None, None) == "0.50" and seeds.format_interval(None, 0, 1) == "–"


def test_stated_coverage_of_few_seed_intervals_holds_in_simulation():
    """The report's warning: a "95%" interval over 2/3/5 seeds holds the true mean about 50/75/84% of the time."""
    rng = np.random.default_rng(5)
    for count, stated in seeds.COVERAGE_OF_95.items():
        hits = [seed_level_interval(rng.normal(0.5, 0.1, count), draws=400, seed=i).excludes(0.5) is False
                for i in range(400)]
        assert np.mean(hits) == pytest.approx(stated, abs=0.07), count


# --- the bench: the pivot on the seed-mean curve, one pivot per seed, the report ----------------------


def _inversion_rows() -> list[dict]:
    """Two seeds, 5 learning rates: seed 0's character match bends at lr index 1, the mean of both clearly at 2."""
    curves = {0: [0.0, 0.6, 0.8, 0.9, 1.0], 1: [0.0, 0.0, 1.0, 1.0, 1.0]}
    return [{"sweep": "inversion", "variant": "none", "lr": lr, "training_seed": k, "run_dir": f"inv-{i}-{k}",
             "pivot_l2_from_init": float(i + 1), "gt_character_match": y, "gt_reconstruction": 0.0,
             "gt_editability": 0.5 + 0.1 * k, "gt_leakage": 0.2 + 0.1 * k, "pivot_digest": f"d{i}{k}"}
            for k, ys in curves.items() for i, (lr, y) in enumerate(zip((1e-3, 3e-3, 1e-2, 3e-2, 1e-1), ys))]


def test_bench_pivot_is_the_knee_of_the_seed_mean_curve_one_run_per_seed():
    rows = _inversion_rows()
    seed0_alone, _ = bench.choose_pivot([r for r in rows if r["training_seed"] == 0], "knee")
    assert seed0_alone["lr"] == 3e-3
    chosen, rule = bench.choose_pivot(bench.point_rows(rows), "knee")
    assert chosen["lr"] == 1e-2 and rule.startswith("knee of gt_character_match")
    pivots = bench.seed_pivots(rows, chosen["lr"], 2)
    assert [(k, p["run_dir"]) for k, p in pivots.items()] == [(0, "inv-2-0"), (1, "inv-2-1")]
    with pytest.raises(SystemExit, match=r"training seeds \[1\]"):
        bench.seed_pivots([r for r in rows if r["run_dir"] != "inv-2-1"], 1e-2, 2)


def _bench_args(training_seeds: int):
    return types.SimpleNamespace(inversion_steps=2, lora_steps=2, seeds=2, sample_steps=2, guidance=3.0,
                                 leakage_threshold=0.1, editability_ratio=0.8, training_seeds=training_seeds)


def test_bench_report_prints_seed_means_with_intervals_and_runs_without():
    rows = _inversion_rows()
    lora = [{"sweep": "lora", "variant": "none", "lr": 1e-3, "training_seed": k, "gt_reconstruction": rec,
             "gt_leakage": leak, "gt_editability": 0.6} for k, rec, leak in ((0, 0.40, 0.25), (1, 0.66, 0.45))]
    pivots = bench.seed_pivots(rows, 1e-2, 2)
    for k, pivot in pivots.items():
        bench_report.add_excess_leakage([r for r in lora if r["training_seed"] == k], pivot)
    # each run's excess is over its own seed's pivot (0.2 and 0.3)
    assert [r["gt_leakage_excess"] for r in lora] == pytest.approx([0.05, 0.15])
    points = bench.point_rows(rows + lora)
    point = next(p for p in points if p["sweep"] == "lora")
    runs_mean = (lora[0]["gt_reconstruction"] + lora[1]["gt_reconstruction"]) / 2
    assert point["gt_reconstruction"] == pytest.approx(runs_mean)
    assert point["gt_reconstruction_lo"] <= 0.40 and point["gt_reconstruction_hi"] >= 0.66
    info = {"lr": 1e-2, "rule": "knee", "digest": "d20", "seeds": [{"digest": "d20"}, {"digest": "d21"}]}
    light = {"none": {"gt_leakage_excess": bench_report.light_point([point], "gt_leakage_excess", 0.2)}}
    text = bench_report.report_text(points, [], light, points[2], info, _bench_args(2))
    assert text.count("0.53 [0.40, 0.66]") == 2  # the LoRA table and the light point
    assert "undercovers" in text and "2 training seeds per point" in text and "digests d20, d21" in text
    single = bench_report.report_text(rows[:5] + lora[:1], [], {}, rows[2], info, _bench_args(1))
    assert not INTERVAL.search(single) and "0.400" in single and "undercovers" not in single


# --- an LR sweep end to end ------------------------------------------------------------------------


def test_lora_sweep_over_two_training_seeds_extends_resumes_and_reports(tiny_model, tiny_dataset, tmp_path):
    preset = _preset(tiny_model, tiny_dataset, tmp_path)
    out = tmp_path / "sweep"
    argv = ["--preset", str(preset), "--stage", "lora", "--lrs", "1e-2", "--steps", "1", "--out", str(out),
            "--max_images", "1", "--leakage", "off", "--sample_steps", "1", "--gpus", "none"]
    rows, printed = _sweep(argv)  # one training seed: the names and report of a sweep without seeds
    assert [r["run"] for r in rows] == ["lora-lr0.01"] and (out / "pivot" / "pti.safetensors").is_file()
    assert "seed_means" not in json.loads((out / "lr_sweep_lora.json").read_text())
    assert not INTERVAL.search(printed) and "undercovers" not in printed

    rows, printed = _sweep(argv + ["--training_seeds", "2"])  # raising N trains only the new seed
    assert "skip pivot: finished" in printed and "skip lora-lr0.01: finished" in printed
    assert [line for line in printed.splitlines() if line.startswith("train ")] == ["train pivot-s1",
                                                                                   "train lora-lr0.01-s1"]
    assert [(r["run"], r["training_seed"]) for r in rows] == [("lora-lr0.01", 0), ("lora-lr0.01-s1", 1)]
    runs = [Path(r["run_dir"]) for r in rows]
    configs = [toml.load(d / "pti.config.toml") for d in runs]
    assert configs[0]["seed"] != configs[1]["seed"]
    assert configs[1]["weights"] == str(out / "pivot-s1" / "tok1.safetensors")
    loras = [load_file(d / "pti.safetensors") for d in runs]
    assert loras[0].keys() == loras[1].keys() and any(not torch.equal(loras[0][k], loras[1][k]) for k in loras[0])

    record = json.loads((out / "lr_sweep_lora.json").read_text())
    (point,) = record["seed_means"]
    scores = [r["reconstruction"] for r in record["rows"]]
    assert point["reconstruction"] == pytest.approx(sum(scores) / 2)
    assert point["reconstruction_lo"] <= min(scores) and point["reconstruction_hi"] >= max(scores)
    assert "undercovers" in printed and INTERVAL.search(printed)

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/**/pti.safetensors")}
    _, printed = _sweep(argv + ["--training_seeds", "2"])  # rerun: nothing trained or evaluated again
    assert "\ntrain " not in printed and printed.count("skip ") == 4 and printed.count(": cached") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/**/pti.safetensors")} == stamps and len(stamps) == 4
