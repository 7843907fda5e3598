"""The analysis scripts end to end on the tiny model: position leakage and the resumable LR sweep."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import runpy
import sys
import types
from pathlib import Path

import pytest
import toml
from PIL import Image

from pti_plugin.config import ConfigError
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.sweeps import lr_sweep, plan, runner

REPO = Path(__file__).resolve().parents[1]


def _raw_preset(tiny_model, tiny_dataset, out: Path, steps: int = 2) -> dict:
    return {
        "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
        "output_dir": str(out), "train_batch_size": 2, "max_train_steps": steps, "log_every_n_steps": 1,
        "network_dim": 4, "network_alpha": 4.0,
        "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2},
                   {"name": "lora", "kind": "lora", "learning_rate": 2e-2}],
    }


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100


def _script(name: str, argv: list[str]) -> str:
    """Run ``analysis/<name>`` as ``__main__`` with ``argv`` (its command line) in this process; return
    what it printed. In-process rather than a subprocess: a fresh interpreter spends ~25 s importing
    torch and diffusers on the 2-core CI machine."""
    saved, buffer = sys.argv, io.StringIO()
    sys.argv = [str(REPO / "analysis" / name)] + argv
    try:
        with contextlib.redirect_stdout(buffer):
            runpy.run_path(str(REPO / "analysis" / name), run_name="__main__")
    finally:
        sys.argv = saved
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lora_sweep(tiny_model, tiny_dataset, tmp_path_factory):
    """A LoRA sweep (2 learning rates, shared pivot, 1 step each) with its evaluation, leakage included."""
    root = tmp_path_factory.mktemp("lora_sweep")
    preset = root / "p.toml"
    preset.write_text(toml.dumps(_raw_preset(tiny_model, tiny_dataset, root / "unused", steps=1)))
    out = root / "sweep"
    argv = ["--preset", str(preset), "--stage", "lora", "--lrs", "1e-3,1e-1", "--steps", "1", "--out", str(out),
            "--max_images", "1", "--leakage_seeds", "2", "--sample_steps", "1", "--leakage_prompts", "{T}",
            "--leakage_edit_prompts"]
    printed = _script("lr_sweep.py", argv)
    return types.SimpleNamespace(out=out, argv=argv, printed=printed)


def test_lr_sweep_lora_end_to_end_with_shared_pivot(lora_sweep):
    out, printed = lora_sweep.out, lora_sweep.printed
    assert "train pivot" in printed and printed.count("train lora-lr") == 2
    assert "reconstruction: proxy_denoise_mse (lower = better)" in printed  # the table's header, as the plots'
    with open(out / "lr_sweep_lora.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-1]
    assert len({r["pivot_digest"] for r in rows}) == 1  # one shared pivot
    for r in rows:
        assert float(r["pivot_l2_from_init"]) > 0  # the pivot run's distance from the init word
        assert float(r["lora_delta_norm"]) > 0 and r["leakage_score"] != ""
        # the headline is the neutral prompts' score; the all-prompt one is kept (no edit prompts here: the same)
        assert r["heatmap_all_leakage_score"] == r["leakage_score"] and "heatmap_neutral_leakage_score" not in r
        assert r["reconstruction_metric"] == "proxy_denoise_mse" and r["editability_metric"] == "proxy_edit_direction_cos"
        assert float(r["lr_x_steps"]) == pytest.approx(float(r["lr"])) and float(r["effective_lr"]) == float(r["lr"])
    assert float(rows[1]["lora_delta_norm"]) > float(rows[0]["lora_delta_norm"])
    config = toml.load(out / "runs" / "lora-lr0.1" / "pti.config.toml")
    assert [s["kind"] for s in config["stages"]] == ["lora"] and config["weights"] == str(out / "pivot" / "tok1.safetensors")
    assert _is_png(out / "lr_sweep_lora.png") and _is_png(out / "lr_sweep_lora_tradeoff.png")
    record = json.loads((out / "lr_sweep_lora.json").read_text())
    assert "maximum distance to the chord" in record["knee_method"] and len(record["rows"]) == 2
    assert record["shared_pivot"] and record["pivot_run"] == str(out / "pivot")


def test_lr_sweep_skips_finished_runs(lora_sweep):
    out = lora_sweep.out
    files = sorted((out / "runs").glob("*/pti.safetensors")) + [out / "pivot" / "pti.safetensors"]
    assert len(files) == 3
    stamps = {p: p.stat().st_mtime_ns for p in files}
    printed = _script("lr_sweep.py", lora_sweep.argv)  # re-run: nothing is trained or re-evaluated
    assert "train " not in printed
    assert "skip pivot: finished" in printed and printed.count("skip lora-lr") == 2 and printed.count(": cached") == 2
    assert {p: p.stat().st_mtime_ns for p in files} == stamps


@pytest.mark.parametrize("script", ["analysis/position_timesteps.py", "analysis/interpolation_paths.py",
                                    "analysis/toy_quality.py", "benchmarks/step_time.py"])
def test_a_model_option_that_is_no_diffusers_folder_is_a_usage_error(script, tmp_path, capsys):
    """``--model`` at a folder without ``model_index.json``: exit 2 naming the option and the folder, before
    anything is loaded or built."""
    saved = sys.argv
    sys.argv = [str(REPO / script), "--model", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        sys.argv = saved
    assert stop.value.code == 2
    assert f"--model {tmp_path}: {tmp_path} is an empty folder; expected a diffusers model folder" in capsys.readouterr().err


def test_position_leakage_names_a_run_it_cannot_measure(lora_sweep, tmp_path, capsys):
    """A folder that is no training output, and a run whose LoRA file is missing (unfinished): exit 2 with a
    message naming --run and what is missing, no traceback."""
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(lora_sweep.out / "runs" / "lora-lr0.1", unfinished, ignore=shutil.ignore_patterns("*.safetensors"))
    for folder, missing in ((tmp_path / "empty", "config.toml"), (unfinished, "the run has not finished")):
        folder.mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as stop:
            _script("position_leakage.py", ["--run", str(folder), "--n_seeds", "2", "--steps", "1"])
        assert stop.value.code == 2
        error = capsys.readouterr().err
        assert f"--run {folder}" in error and missing in error and "Traceback" not in error


def test_position_leakage_command_line(lora_sweep, tmp_path):
    run_dir = lora_sweep.out / "runs" / "lora-lr0.1"
    out = tmp_path / "leak"
    printed = _script("position_leakage.py", ["--run", str(run_dir), "--n_seeds", "2", "--steps", "2", "--prompts", "{T}",
                                              "--edit_prompts", "{T} at the top left", "--out", str(out),
                                              "--by_resolution"])
    assert "leakage_score=" in printed and "heatmap     all:" in printed
    record = json.loads((out / "position_leakage.json").read_text())
    by_resolution = record["by_resolution"]  # the tiny UNet's cross-attention levels, finest first
    assert list(by_resolution) == ["16x16", "8x8", "4x4", "2x2"]
    assert all(math.isfinite(entry["leakage_score"]) for entry in by_resolution.values())
    assert "neutral prompts, layers at 16x16 only: leakage" in printed
    summary = record["summary"]
    for family in ("heatmap", "centroid"):
        for group in ("all", "neutral", "edit"):
            entry = summary[family][group]
            assert {"diversity_base", "diversity_tuned", "attraction_base", "attraction_tuned",
                    "diversity_ratio", "attraction_ratio", "leakage_score"} <= set(entry)
    assert "paired_distance" in summary["heatmap"]["edit"] and "training_observer_distance" in summary["heatmap"]["all"]
    neutral, everything = summary["heatmap"]["neutral"]["leakage_score"], summary["heatmap"]["all"]["leakage_score"]
    assert record["leakage_score"] == neutral != everything and record["all_prompts_leakage_score"] == everything
    assert record["n_seeds"] == 2 and record["leakage_score_lo"] <= neutral <= record["leakage_score_hi"]
    assert (f"leakage_score={neutral:+.4f} [{record['leakage_score_lo']:+.4f}, {record['leakage_score_hi']:+.4f}] "
            "(neutral prompts, n_seeds=2)") in printed
    assert f"neutral prompts, every layer (the headline): leakage {neutral:+.3f}" in printed
    assert record["settings"]["prompts"] == ["an anime illustration of tok1", "an anime illustration of tok1 at the top left"]
    with open(out / "position_leakage.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 + 2 * 4  # prompts x models x seeds, plus 4 training images x 2 observing models
    assert {r["model"] for r in rows if r["kind"] == "generation"} == {"base", "tuned"}
    assert all(0 <= float(r["centroid_x"]) <= 1 and 0 <= float(r["centroid_y"]) <= 1 for r in rows)
    assert _is_png(out / "position_leakage_centroids.png") and _is_png(out / "position_leakage_grid.png")


@register_plugin
class _SomePlugin(Plugin):
    name = "sweep_test_plugin"

    @dataclasses.dataclass
    class Options:
        weight: float = 1.0


def test_lr_sweep_derived_presets_and_plugin_variants(tiny_model, tiny_dataset, tmp_path):
    raw = _raw_preset(tiny_model, tiny_dataset, tmp_path / "unused")
    raw["stages"].append({"name": "lora2", "kind": "lora", "learning_rate": 1.0})
    preset = tmp_path / "p.toml"
    preset.write_text(toml.dumps(raw))
    base = ["--preset", str(preset), "--stage", "lora", "--lrs", "1e-4,1e-3", "--steps", "5", "--out", str(tmp_path / "s"),
            "--with_plugin", "sweep_test_plugin", "--plugin_set", "weight=0.5"]
    args = lr_sweep.parse_args(base)
    assert args.leakage_on  # lora sweeps measure leakage by default
    pivot = plan.plan_pivot(args, raw)  # the shared pivot: the stages before the lora stage, once, without the plugin
    derived = toml.load(pivot.preset_path)
    assert [s["name"] for s in derived["stages"]] == ["inversion"] and derived["plugins"] == {}
    assert pivot.embedding == tmp_path / "s" / "pivot" / "tok1.safetensors"
    with pytest.raises(ConfigError, match="unknown plugin"):  # refused before any training
        plan.plan_runs(lr_sweep.parse_args(base[:-4] + ["--with_plugin", "no_such_plugin"]), raw, {0: pivot})
    specs = plan.plan_runs(args, raw, {0: pivot})
    assert [s.name for s in specs] == ["lora-lr0.0001", "lora-lr0.001", "lora-lr0.0001-sweep_test_plugin", "lora-lr0.001-sweep_test_plugin"]
    for spec in specs:
        derived = toml.load(spec.preset_path)
        assert [s["name"] for s in derived["stages"]] == ["lora"] and derived["weights"] == str(pivot.embedding)
        lora = derived["stages"][0]
        assert lora["learning_rate"] == lora["unet_lr"] == spec.lr and lora["steps"] == 5
        assert derived["output_dir"] == str(spec.run_dir)
        assert derived["plugins"] == ({"sweep_test_plugin": {"weight": 0.5}} if spec.variant == "sweep_test_plugin" else {})
    # Without a shared pivot, every run repeats the preset's stages up to the lora stage (later ones dropped).
    args = lr_sweep.parse_args(base + ["--shared_pivot", "off"])
    assert plan.plan_pivot(args, raw) is None
    for spec in plan.plan_runs(args, raw):
        derived = toml.load(spec.preset_path)
        assert [s["name"] for s in derived["stages"]] == ["inversion", "lora"] and "weights" not in derived
        assert derived["stages"][0] == raw["stages"][0]
    # An inversion sweep keeps the inversion stage alone, at the swept learning rate and step budget.
    args = lr_sweep.parse_args(["--preset", str(preset), "--stage", "inversion", "--lrs", "5e-3", "--steps", "7",
                                "--out", str(tmp_path / "i")])
    assert not args.leakage_on and plan.plan_pivot(args, raw) is None
    (spec,) = plan.plan_runs(args, raw)
    derived = toml.load(spec.preset_path)
    assert spec.name == "inversion-lr0.005"
    assert derived["stages"] == [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-3, "steps": 7}]


def test_gpu_scheduler_runs_one_process_per_device(tmp_path):
    code = "import os, time; time.sleep(0.2); print('device', os.environ['CUDA_VISIBLE_DEVICES'])"
    jobs = [(f"job{i}", [sys.executable, "-c", code], tmp_path / f"job{i}.log") for i in range(3)]
    codes = runner.run_on_gpus(jobs, ["0", "1"])
    assert codes == {"job0": 0, "job1": 0, "job2": 0}
    devices = [(tmp_path / f"job{i}.log").read_text().split()[-1] for i in range(3)]
    assert devices[:2] == ["0", "1"] and devices[2] in ("0", "1")


def test_sweep_workers_import_this_package(tmp_path):
    """Worker processes (training, evaluation) import the same ``pti_plugin`` as the sweep, from any folder."""
    import subprocess

    import pti_plugin

    code = "import pti_plugin; print(pti_plugin.__file__)"
    printed = subprocess.run([sys.executable, "-c", code], env=runner.worker_env(), cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert printed == pti_plugin.__file__
    assert runner.train_command(["--preset", "p.toml"])[-2:] == ["--preset", "p.toml"]


def _h3_record(**readings) -> dict:
    """An H3 part's record over 4 neutral images and 4 drift images: every key a measured cell has, the
    character in every neutral image, no drift, with ``readings`` replacing those lists."""
    from pti_plugin.protocol.h1_inversion import NEUTRAL_KEYS
    from pti_plugin.protocol.h3_variants import DRIFT_KEYS

    return {key: [0] * 4 for key in DRIFT_KEYS} | {key: [1] * 4 for key in NEUTRAL_KEYS} | readings


def test_detail_size_reads_each_cells_images_and_intervals_over_seeds(tmp_path, capsys):
    """Two training seeds of one condition: seed 42 draws the dot in every image, seed 1 a white hole in
    half of them; the script reports detail 1.0 for both and true-size detail 1.0 and 0.5 (mean 0.75)."""
    import numpy as np

    from pti_plugin.toy_world.detectors import _distance_from
    from pti_plugin.toy_world.world import render_character

    parts = tmp_path / "protocol" / "h3" / "parts"
    parts.mkdir(parents=True)
    dot = render_character(16.2, 15.7, "gray")
    hole = dot.copy()
    hole[_distance_from((16.2, 15.7)) <= 2.2] = 255
    drift = np.zeros((4, 32, 32, 3), dtype=np.uint8)  # after the neutral images: not read
    for seed, neutral in ((42, [dot] * 4), (1, [dot, hole] * 2)):
        name = f"h3-half_angle-w1-lr0.001-seed{seed}"
        np.savez_compressed(parts / f"{name}.npz", images=np.concatenate([np.stack(neutral), drift]))
        (parts / f"{name}.json").write_text(json.dumps(_h3_record(in_training_cell=[1, 0, 0, None])))
    namespace = runpy.run_path(str(REPO / "analysis" / "detail_size.py"), run_name="detail_size_under_test")
    assert namespace["main"](["--out", str(tmp_path / "protocol"), "--results", str(tmp_path / "results"),
                              "--draws", "200"]) == 0
    assert capsys.readouterr().out.strip().endswith("cells=2")
    (row,) = json.loads((tmp_path / "results" / "detail_size.json").read_text())
    assert (row["variant"], row["weight"], row["lr"], row["seeds"]) == ("half_angle", 1.0, 1e-3, [1, 42])
    assert row["detail"] == {"estimate": 1.0, "lo": 1.0, "hi": 1.0}
    assert row["true_size_detail"]["estimate"] == pytest.approx(0.75)
    assert row["true_size_detail"]["lo"] == pytest.approx(0.5) and row["true_size_detail"]["hi"] == pytest.approx(1.0)
    assert row["training_cells"]["estimate"] == pytest.approx(1 / 3)
    assert 4 <= row["median_detail_pixels"] <= 7  # 6 dots, 2 holes: the median is a dot's
    assert (tmp_path / "results" / "h3_detail_axis.png").stat().st_size > 0


def test_detail_size_does_not_replace_a_table_over_cells_it_cannot_read(tmp_path, capsys):
    """A table written from a folder that held seeds 42 and 1 is kept when a new folder holds only seed 42's
    images (the run names the missing cell and exits non-zero); ``--replace`` writes the smaller table."""
    import numpy as np

    from pti_plugin.toy_world.world import render_character

    dot, drift = render_character(16.2, 15.7, "gray"), np.zeros((4, 32, 32, 3), dtype=np.uint8)
    parts = tmp_path / "protocol" / "h3" / "parts"
    parts.mkdir(parents=True)
    for seed in (42, 1):
        name = f"h3-none-lr0.001-seed{seed}"
        np.savez_compressed(parts / f"{name}.npz", images=np.concatenate([np.stack([dot] * 4), drift]))
        (parts / f"{name}.json").write_text(json.dumps(_h3_record(in_training_cell=[1, 1, 0, 0])))
    namespace = runpy.run_path(str(REPO / "analysis" / "detail_size.py"), run_name="detail_size_under_test")
    args = ["--out", str(tmp_path / "protocol"), "--results", str(tmp_path / "results"), "--draws", "50"]
    assert namespace["main"](args) == 0
    written = (tmp_path / "results" / "detail_size.json").read_bytes()
    (parts / "h3-none-lr0.001-seed1.npz").unlink()  # a fresh machine: that cell's images are gone
    with pytest.raises(SystemExit, match=r"not replaced: it holds 1 cells.*'none', None, 0.001, 1"):
        namespace["main"](args)
    assert (tmp_path / "results" / "detail_size.json").read_bytes() == written
    assert namespace["main"]([*args, "--replace"]) == 0
    (row,) = json.loads((tmp_path / "results" / "detail_size.json").read_text())
    assert row["seeds"] == [42]


def test_detail_size_reads_several_folders_and_counts_a_cell_once(tmp_path, capsys):
    """An exploratory folder beside the protocol's: its new condition is added, and a cell both hold is
    read from the first folder only."""
    import shutil

    import numpy as np

    from pti_plugin.toy_world.world import render_character

    dot, drift = render_character(16.2, 15.7, "gray"), np.zeros((4, 32, 32, 3), dtype=np.uint8)
    first, second = tmp_path / "protocol" / "h3" / "parts", tmp_path / "explore" / "h3" / "parts"
    for folder, names in ((first, ["h3-none-lr0.001-seed42"]),
                          (second, ["h3-none-lr0.001-seed42", "h3-half_angle-w0.3-lr0.001-seed42"])):
        folder.mkdir(parents=True)
        for name in names:
            np.savez_compressed(folder / f"{name}.npz", images=np.concatenate([np.stack([dot] * 4), drift]))
            (folder / f"{name}.json").write_text(json.dumps(_h3_record(in_training_cell=[1, 1, 0, 0])))
    (second / "h3-none-lr0.001-seed42.json").write_text(json.dumps(_h3_record(in_training_cell=[0] * 4)))
    namespace = runpy.run_path(str(REPO / "analysis" / "detail_size.py"), run_name="detail_size_under_test")
    assert namespace["main"](["--out", str(tmp_path / "protocol"), "--out", str(tmp_path / "explore"),
                              "--results", str(tmp_path / "results"), "--draws", "100"]) == 0
    assert capsys.readouterr().out.strip().endswith("cells=2")
    rows = {r["variant"]: r for r in json.loads((tmp_path / "results" / "detail_size.json").read_text())}
    assert sorted(rows) == ["half_angle", "none"] and rows["half_angle"]["weight"] == 0.3
    assert rows["none"]["training_cells"]["estimate"] == 0.5  # the first folder's cell, not the second's 0
    shutil.rmtree(tmp_path / "explore")
    with pytest.raises(SystemExit) as stop:  # a folder without parts is named, as a usage error
        namespace["main"](["--out", str(tmp_path / "protocol"), "--out", str(tmp_path / "explore")])
    assert stop.value.code == 2 and "explore" in capsys.readouterr().err
