"""Distributed sweeps: a 2-run sweep through Ray on this machine's CPU equals the in-process sweep, and resumes alike."""

from __future__ import annotations

import contextlib
import io

import pytest
import toml
import torch
from safetensors.torch import load_file

from pti_plugin.sweeps import lr_sweep

pytest.importorskip("ray", reason="the optional extra: pip install -e '.[cluster]'")


def _sweep(argv: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        lr_sweep.main(argv)
    return buffer.getvalue()


def test_two_run_sweep_through_ray_equals_in_process_and_resumes(tiny_model, tiny_dataset, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(toml.dumps({
        "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
        "output_dir": str(tmp_path / "unused"), "train_batch_size": 2, "seed": 3,
        "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2}],
    }))
    argv = ["--preset", str(preset), "--stage", "inversion", "--lrs", "1e-2,1e-1", "--steps", "2", "--no_evaluate"]
    printed = _sweep(argv + ["--out", str(tmp_path / "ray"), "--engine", "ray"])
    assert "Ray tasks (local Ray)" in printed
    for run in ("inversion-lr0.01", "inversion-lr0.1"):
        assert f"ray: {run} finished with exit code 0" in printed
    _sweep(argv + ["--out", str(tmp_path / "local")])  # the same sweep, in this process
    for run in ("inversion-lr0.01", "inversion-lr0.1"):
        through_ray = load_file(tmp_path / "ray" / "runs" / run / "tok1.safetensors")
        here = load_file(tmp_path / "local" / "runs" / run / "tok1.safetensors")
        assert through_ray.keys() == here.keys() and all((through_ray[k] == here[k]).all() for k in here)
    low, high = (load_file(tmp_path / "ray" / "runs" / r / "tok1.safetensors") for r in ("inversion-lr0.01", "inversion-lr0.1"))
    assert any(not torch.equal(low[k], high[k]) for k in low)  # two runs, not one run twice

    files = sorted((tmp_path / "ray" / "runs").glob("*/pti.safetensors"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    printed = _sweep(argv + ["--out", str(tmp_path / "ray"), "--engine", "ray"])  # resume: both finished
    assert printed.count("skip inversion-lr") == 2 and "ray: " not in printed
    assert {f: f.stat().st_mtime_ns for f in files} == stamps and len(files) == 2


def test_ray_options_without_the_ray_engine_are_refused():
    args = lr_sweep.parse_args(["--preset", "p.toml", "--stage", "lora", "--lrs", "1e-3", "--address", "auto"])
    with pytest.raises(SystemExit, match="--engine ray only"):
        lr_sweep.engine_from_args(args, [])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--leakage_seeds", "1"], "argument --leakage_seeds: must be at least 2, got 1 (layout diversity compares seeds)"),
    (["--max_images", "0"], "argument --max_images: must be at least 1, got 0"),
    (["--save_every", "-1"], "argument --save_every: must be at least 0, got -1"),
    (["--training_seeds", "0"], "argument --training_seeds: must be at least 1, got 0"),
    (["--lrs", "1e-3,nan"], "argument --lrs: expected positive finite numbers, got nan"),
    (["--lrs=-1e-3"], "argument --lrs: expected positive finite numbers, got -0.001"),
    (["--lrs", "1e-3,x"], "argument --lrs: expected comma-separated numbers, got '1e-3,x'"),
])
def test_a_sweep_setting_that_cannot_run_is_refused_naming_its_flag(argv, message, capsys):
    """Refused by the argument parser, before any preset is read or run trained (a sweep of 0 steps used to
    reach the preset's check and be named as 'stages.0.steps')."""
    with pytest.raises(SystemExit) as stop:
        lr_sweep.parse_args(["--preset", "p.toml", "--stage", "lora", "--lrs", "1e-3", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err
