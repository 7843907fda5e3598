"""The research bench end to end on the shipped toy world, at one step per run (the real bench
runs outside CI): both sweeps, the shared pivot, the four LoRA variants, the ground-truth and
model-internal scores, the correlations, and resuming from a finished bench."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import types
from pathlib import Path

import pytest
import toml
from safetensors import safe_open

from pti_plugin.toy_world import WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "analysis" / "research_bench.py"

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").is_file(), reason="shipped toy weights absent")


def _bench(argv: list[str]) -> tuple[dict, str]:
    """Run the bench in this process (a fresh interpreter spends ~25 s importing torch); return (result, printed)."""
    from accelerate.state import AcceleratorState, GradientState

    saved, buffer = sys.argv, io.StringIO()
    sys.argv = [str(BENCH)] + argv
    try:
        with contextlib.redirect_stdout(buffer):
            namespace = runpy.run_path(str(BENCH), run_name="bench_under_test")
            result = namespace["main"](argv)
    finally:
        sys.argv = saved
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return result, buffer.getvalue()


@pytest.fixture(scope="module")
def bench(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("bench") / "out"
    # one step of each run and of each generation, one probe image: every score is still measured (not None), and the
    # 10x inversion rate still moves the pivot farther (Adam's first step moves it about the rate)
    argv = ["--out", str(out), "--inversion_lrs", "1e-2,1e-1", "--lora_lrs", "3e-2", "--inversion_steps", "1",
            "--lora_steps", "1", "--seeds", "2", "--sample_steps", "1", "--reg_images", "2", "--max_images", "1"]
    result, printed = _bench(argv)
    return types.SimpleNamespace(out=out, argv=argv, result=result, printed=printed)


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """The embedded character dataset goes to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PTI_PLUGIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield patch


def test_bench_runs_both_sweeps_and_every_variant(bench):
    rows = bench.result["rows"]
    assert [(r["sweep"], r["variant"], r["lr"]) for r in rows] == [
        ("inversion", "none", 1e-2), ("inversion", "none", 1e-1),
        *[("lora", v, 3e-2) for v in ("none", "half_angle", "class_endpoint", "reg_images")],
    ]
    for row in rows:  # every run scored, ground truth and model-internal side by side
        for key in ("gt_reconstruction", "gt_editability", "gt_leakage", "attention_leakage", "proxy_denoise_mse",
                    "proxy_edit_direction_cos", "gt_training_cell_fraction"):
            assert row[key] is not None, (row["run_dir"], key)
        assert 0.0 <= row["gt_reconstruction"] <= 1.0 and 0.0 <= row["gt_editability"] <= 1.0
    inversion = [r for r in rows if r["sweep"] == "inversion"]
    assert inversion[1]["pivot_l2_from_init"] > inversion[0]["pivot_l2_from_init"] > 0  # 10x the lr moves farther
    for name in ("research_bench.json", "research_bench.csv", "research_bench.md", "research_bench.png"):
        assert (bench.out / name).stat().st_size > 100
    assert json.loads((bench.out / "research_bench.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_lora_runs_share_the_chosen_pivot(bench):
    pivot = bench.result["pivot"]
    assert pivot["rule"].startswith("middle")  # 2 inversion runs: no knee
    chosen = next(r for r in bench.result["rows"] if r["sweep"] == "inversion" and r["lr"] == pivot["lr"])
    lora = [r for r in bench.result["rows"] if r["sweep"] == "lora"]
    assert {r["pivot_digest"] for r in lora} == {chosen["pivot_digest"]} == {pivot["digest"]}
    for r in lora:  # the lora stage alone, started from the pivot
        config = toml.load(next(Path(r["run_dir"]).glob("*.config.toml")))
        assert Path(config["weights"]) == Path(pivot["file"]) and [s["kind"] for s in config["stages"]] == ["lora"]


def test_variants_train_what_they_say(bench):
    for r in (r for r in bench.result["rows"] if r["sweep"] == "lora"):
        run_dir = Path(r["run_dir"])
        config = toml.load(next(run_dir.glob("*.config.toml")))
        with safe_open(str(run_dir / "bench.safetensors"), "pt") as handle:
            metadata = handle.metadata()
        locality = json.loads(metadata["pti_pivot_locality"]) if "pti_pivot_locality" in metadata else None
        expected = {"half_angle": [0.5], "class_endpoint": [1.0]}.get(r["variant"])
        assert (locality or {}).get("fractions") == expected, r["variant"]
        assert bool(config.get("reg_data_dir")) == (r["variant"] == "reg_images")
    reg = bench.out / "reg" / "1_character"
    assert len(list(reg.glob("*.png"))) == 2
    assert {p.read_text().strip() for p in reg.glob("*.txt")} == {"an anime illustration of character"}


def test_reg_images_are_not_measured_as_training_images(bench):
    from pti_plugin.metrics.run_model import load_run

    reg_run = next(r for r in bench.result["rows"] if r["variant"] == "reg_images")
    run = load_run(reg_run["run_dir"], device="cpu")
    assert len(run.items) == 6 and not any(item.is_reg for item in run.items)


def test_correlations_and_light_points_are_reported(bench):
    corr = {(c["internal"], c["ground_truth"], c["runs"]): c for c in bench.result["correlations"]}
    assert corr[("attention_leakage", "gt_leakage", "lora")]["n"] == 4
    assert corr[("proxy_denoise_mse", "gt_reconstruction", "all")]["n"] == 6
    assert set(bench.result["light_points"]) == {"none", "half_angle", "class_endpoint", "reg_images"}
    pivot_row = next(r for r in bench.result["rows"] if r["sweep"] == "inversion" and r["lr"] == bench.result["pivot"]["lr"])
    for r in (r for r in bench.result["rows"] if r["sweep"] == "lora"):
        assert r["gt_leakage_excess"] == pytest.approx(r["gt_leakage"] - pivot_row["gt_leakage"])
    assert "Model-internal metrics against the ground truth" in bench.printed
    assert "attention_leakage | gt_leakage | lora" in (bench.out / "research_bench.md").read_text()


def test_a_second_bench_resumes_without_training_or_scoring(bench):
    result, printed = _bench(bench.argv)
    assert "train " not in printed.replace("train pivot", "") and printed.count("skip ") == 6
    assert printed.count(": cached") == 6 and not any(line.startswith("score ") for line in printed.splitlines())
    assert result["rows"] == bench.result["rows"]


def test_light_point_picks_the_best_reconstruction_under_the_threshold():
    from pti_plugin.sweeps.bench_report import add_excess_leakage, light_point

    pivot = {"sweep": "inversion", "gt_leakage": 0.2, "attention_leakage": -0.1}
    rows = [{"sweep": "lora", "lr": 1e-4, "gt_reconstruction": 0.2, "gt_leakage": 0.2, "attention_leakage": 0.0},
            {"sweep": "lora", "lr": 1e-3, "gt_reconstruction": 0.6, "gt_leakage": 0.3, "attention_leakage": None},
            {"sweep": "lora", "lr": 1e-2, "gt_reconstruction": 0.9, "gt_leakage": 0.7, "attention_leakage": 0.5}]
    add_excess_leakage(rows, pivot)
    assert [r["gt_leakage_excess"] for r in rows] == pytest.approx([0.0, 0.1, 0.5])
    assert rows[0]["attention_leakage_excess"] == pytest.approx(0.1) and "attention_leakage_excess" not in rows[1]
    assert light_point(rows, "gt_leakage_excess", 0.15)["lr"] == 1e-3
    assert light_point(rows, "gt_leakage_excess", 0.6)["lr"] == 1e-2
    assert light_point(rows, "gt_leakage_excess", -1.0) is None
    assert light_point(rows, "attention_leakage_excess", 0.15)["lr"] == 1e-4
    rows[1]["gt_editability"], rows[0]["gt_editability"] = 0.3, 0.7  # the better run broke editability
    assert light_point(rows, "gt_leakage_excess", 0.15, min_editability=0.5)["lr"] == 1e-4


def test_scores_are_deterministic(bench):
    from pti_plugin.toy_world.run_scores import ScoreSettings, score_run

    run_dir = next(r["run_dir"] for r in bench.result["rows"] if r["variant"] == "half_angle")
    settings = ScoreSettings(seeds=2, steps=1, max_images=1)
    again = score_run(run_dir, settings, device="cpu")  # a second scoring, in this process, of the same files
    cached = json.loads((Path(run_dir) / "bench_scores.json").read_text())
    assert cached["scores"] == again  # equals the bench's own scoring, with the same settings


@pytest.mark.parametrize("flag, value, message", [
    ("--seeds", "1", "argument --seeds: must be at least 2, got 1 (layout diversity compares seeds)"),
    ("--lora_steps", "0", "argument --lora_steps: must be at least 1, got 0"),
    ("--max_images", "0", "argument --max_images: must be at least 1, got 0"),
    ("--training_seeds", "0", "argument --training_seeds: must be at least 1, got 0"),
    ("--inversion_lrs", "1e-3,nan", "argument --inversion_lrs: expected positive finite numbers, got nan"),
    ("--lora_lrs", "1e-3,x", "argument --lora_lrs: expected comma-separated numbers, got '1e-3,x'"),
])
def test_a_bench_setting_that_cannot_run_is_refused_before_anything_trains(flag, value, message, tmp_path, capsys):
    """Exit 2 naming the flag, and nothing written under --out (a 0 used to start the whole bench)."""
    from pti_plugin.sweeps.bench import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--out", str(tmp_path / "bench"), flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
