"""The research bench and internal_metrics.py take the toy world only, and say so before anything trains or loads.

Before: the bench trained a 64 px preset, then stopped on ``ValueError: expected a (32, 32, 3) image`` (hours on a real
SD1.5), and a 512 px model trained at 32 px wrote a report whose every ground-truth score was 0; internal_metrics.py
sampled a 64 px run for minutes before the same ValueError, crashed with "no cross-attention call was recorded" at
--sample_steps 2 or 4 (no DDIM step in the band 780-930), and without --output_name exited 1 as a failed run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import toml

from pti_plugin.toy_world import WEIGHTS_DIR

from .conftest import make_preset

ROOT = Path(__file__).resolve().parents[1]


class Reached(Exception):
    """Raised where the work (training, scoring) would begin: the checks before it let the input through."""


def _reached(*args, **kwargs):
    raise Reached()


def _script():
    spec = importlib.util.spec_from_file_location("internal_metrics_s38", ROOT / "analysis" / "internal_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_drawing_512(tiny_model: Path, folder: Path) -> Path:
    """The tiny model's files (linked), its UNet config's sample_size 256: with its factor-2 VAE, 512 px images."""
    shutil.copytree(tiny_model, folder, copy_function=os.symlink)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.unlink()  # a link to the tiny model's file: replaced, not written through
    config_path.write_text(json.dumps(config | {"sample_size": 256}))
    return folder


# ---------------------------------------------------------------------------------------------- the research bench
@pytest.mark.parametrize("case", ["64px", "512px_model"])
def test_the_bench_refuses_a_preset_that_is_not_the_toy_worlds_before_training(case, tiny_model, tiny_dataset,
                                                                                 tmp_path, capsys, monkeypatch):
    from pti_plugin.sweeps import bench

    monkeypatch.setattr(bench, "run_sweep", _reached)
    if case == "64px":
        raw = make_preset(tiny_model, tiny_dataset, tmp_path / "o", resolution=64)
        expected = f"resolution 64 (model {tiny_model}): its generations are 64x64 px (its first training image's bucket)"
    else:
        model = _model_drawing_512(tiny_model, tmp_path / "model512")
        raw = make_preset(model, tiny_dataset, tmp_path / "o")
        expected = f"pretrained_model_name_or_path {model}: a model whose images are 512 px, not a toy-world model"
    preset = tmp_path / "preset.toml"
    preset.write_text(toml.dumps(raw))
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as stop:
        bench.main(["--preset", str(preset), "--out", str(out), "--variants", "none"])
    assert stop.value.code == 2
    assert f"error: --preset {preset}: {expected}" in capsys.readouterr().err
    assert not out.exists()
    preset.write_text(toml.dumps(raw | {"pretrained_model_name_or_path": str(tiny_model), "resolution": 32}))
    with pytest.raises(Reached):  # the tiny model at the toy world's 32 px goes on to the training
        bench.main(["--preset", str(preset), "--out", str(out), "--variants", "none"])


# ---------------------------------------------------------------------------------------------- internal_metrics.py
def _run(folder: Path, tiny_model: Path, tiny_dataset: Path, output_name: str = "premise", **overrides) -> Path:
    """A finished run's files (the LoRA and the embedding empty: nothing may load them) with its config."""
    folder.mkdir(parents=True)
    raw = make_preset(tiny_model, tiny_dataset, folder, output_name=output_name, token_string="tok1", **overrides)
    (folder / f"{output_name}.config.toml").write_text(toml.dumps(raw))
    for name in (output_name, "tok1"):
        (folder / f"{name}.safetensors").write_bytes(b"")
    return folder


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        _script().main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_scoring(monkeypatch):
    import pti_plugin.protocol.internal_metrics as internal_metrics

    monkeypatch.setattr(internal_metrics, "score_runs", _reached)
    monkeypatch.setattr(internal_metrics, "layer_rows", _reached)


def test_a_run_not_drawn_at_32_px_is_refused_before_scoring(tiny_model, tiny_dataset, tmp_path, capsys, no_scoring):
    run = _run(tmp_path / "runs" / "r64", tiny_model, tiny_dataset, resolution=64)
    err = _refused([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--seeds", "2", "--no_band"], capsys)
    assert f"error: {run}: resolution 64 (model {tiny_model}): its generations are 64x64 px" in err
    assert "toy world's 32 px scenes" in err and not (tmp_path / "out").exists()


def test_a_real_models_run_at_32_px_is_refused_before_scoring(tiny_model, tiny_dataset, tmp_path, capsys, no_scoring):
    model = _model_drawing_512(tiny_model, tmp_path / "model512")
    run = _run(tmp_path / "runs" / "r512", model, tiny_dataset)
    err = _refused([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no_band"], capsys)
    assert f"error: {run}: pretrained_model_name_or_path {model}: a model whose images are 512 px" in err


def test_the_band_check_reads_the_ddim_timesteps_of_the_models_scheduler(tiny_model):
    """Hand-derived from diffusers' DDIM spacings over 1000 training steps: the shipped toy model's ``trailing``
    (999 - k * 1000 / n, rounded) and the tiny model's ``leading`` with steps_offset 1 (k * (1000 // n) + 1)."""
    from pti_plugin.protocol.internal_metrics import band_steps_problem

    toy = WEIGHTS_DIR / "scheduler" / "scheduler_config.json"
    tiny = tiny_model / "scheduler" / "scheduler_config.json"
    assert "none of the DDIM sampler's timesteps (999, 499;" in band_steps_problem(toy, 2, (780, 930))
    four = band_steps_problem(toy, 4, (780, 930), default_band=True)
    assert four.startswith("--sample_steps 4 with --band 780,930 (the default")
    assert "(999, 749, 499, 249;" in four and four.endswith("use --sample_steps 5 (the fewest steps above 4 with "
                                                           "one in the band) or --no_band")
    assert band_steps_problem(toy, 5, (780, 930)) is None  # 999, 799, ...
    assert band_steps_problem(toy, 25, (780, 930)) is None
    assert "(501, 1;" in band_steps_problem(tiny, 2, (780, 930))
    assert band_steps_problem(tiny, 5, (780, 930)) is None  # 801, 601, ...
    # 5 steps: 201 lies just above 200; 6 steps: 831, 665, 499, 333, 167, 1
    assert "use --sample_steps 6 " in band_steps_problem(tiny, 4, (100, 200))


def test_sample_steps_that_miss_the_band_are_refused_before_any_model_loads(tiny_model, tiny_dataset, tmp_path,
                                                                             capsys, no_scoring):
    runs = tmp_path / "runs"
    _run(runs / "toy", tiny_model, tiny_dataset)
    out = ["--out", str(tmp_path / "out")]
    err = _refused([str(runs), *out, "--sample_steps", "2"], capsys)
    assert "error: --sample_steps 2 with --band 780,930 (the default: the toy world's position band)" in err
    assert "(501, 1;" in err and "use --sample_steps 5 " in err and "or --no_band" in err
    err = _refused([str(runs), *out, "--sample_steps", "4", "--band", "100,200"], capsys)
    assert "--sample_steps 4 with --band 100,200: none" in err and "use --sample_steps 6 " in err
    for argv in (["--sample_steps", "2", "--no_band"], ["--sample_steps", "5"], ["--sample_steps", "2", "--layers_only"]):
        with pytest.raises(Reached):  # no band, a band reached, or no band version measured: on to the scoring
            _script().main([str(runs), *out, *argv])


def test_folders_without_a_run_of_output_name_are_a_usage_error_naming_the_names_there(tiny_model, tiny_dataset,
                                                                                        tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "a", tiny_model, tiny_dataset, output_name="demo")
    _run(runs / "b", tiny_model, tiny_dataset, output_name="sd15")
    (runs / "b" / "tok1.safetensors").unlink()  # sd15 stopped before its embedding: not a finished run
    err = _refused([str(runs), "--out", str(tmp_path / "out")], capsys)
    assert (f"error: --output_name premise: no finished run (premise.safetensors) under {runs}; the finished runs "
            "there are named demo: pass --output_name demo") in err
    assert not (tmp_path / "out").exists()


def test_the_descriptions_say_toy_world_only_and_cite_no_issue(capsys):
    from pti_plugin.sweeps.bench import parse_args

    with pytest.raises(SystemExit):
        _script().parse_args(["--help"])
    internal = capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    bench = capsys.readouterr().out
    assert "toy-world runs only" in " ".join(internal.split())
    assert "(issue" not in internal and "(issue" not in bench and "toy world" in " ".join(bench.split())


# ---------------------------------------------------------------------------------------------- learning_curves.py
def test_learning_curves_refuses_a_real_models_run_at_32_px_before_scoring(tiny_model, tiny_dataset, tmp_path,
                                                                         capsys, monkeypatch):
    """learning_curves.py checked only a run's generation size: a 512 px model's run trained at 32 px passed and was
    scored with the toy world's detectors (every score 0). It is now refused as internal_metrics.py refuses it."""
    import pti_plugin.protocol.curve_scores as curve_scores

    monkeypatch.setattr(curve_scores, "score_checkpoints", _reached)
    stages = [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]
    runs = {}
    for name, model in (("toy", tiny_model), ("r512", _model_drawing_512(tiny_model, tmp_path / "model512"))):
        run = runs[name] = _run(tmp_path / name, model, tiny_dataset, output_name="pti", stages=stages)
        (run / "pti.safetensors").unlink()  # unfinished: its intermediate saves only, never read here
        for step in (2, 3):
            (run / f"pti-step{step:08d}.safetensors").write_bytes(b"")
    spec = importlib.util.spec_from_file_location("learning_curves_s38", ROOT / "analysis" / "learning_curves.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        script.main([str(runs["toy"]), str(runs["r512"]), *out])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert (f"error: {runs['r512']}: pretrained_model_name_or_path {tmp_path / 'model512'}: a model whose images are "
            "512 px, not a toy-world model") in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(Reached):  # the tiny model's 32 px run alone goes on to the scoring
        script.main([str(runs["toy"]), *out])
