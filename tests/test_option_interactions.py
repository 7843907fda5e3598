"""kohya training options in combination: warm-up vs scheduler and stage length, noise and sampling limits,
logging_dir alone. Each bad combination is refused at start naming its key (exit 2, nothing written) instead of
being ignored silently or failing with a traceback once training had run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pti_plugin.config_loading import build_config
from pti_plugin.resolution import with_epoch_steps
from pti_plugin.trainer import Trainer

from .test_reliability import _assert_clean, _cli, _output_state


@pytest.fixture
def short(preset, tmp_path):
    """A one-step inversion run; the output folder holds an earlier run's file that must survive."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier-run.safetensors").write_bytes(b"earlier")
    return lambda **overrides: preset(**({"stages": [{"kind": "inversion", "steps": 1}]} | overrides))


def _prompts(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(text + "\n")
    return str(path)


CASES = {
    # before: accepted, and the stage's warm-up was -1
    "negative stage warm-up": (lambda t: {"stages": [{"kind": "inversion", "steps": 1, "lr_warmup_steps": -1}]},
                               [], "key 'stages.0.lr_warmup_steps' must be >= 0"),
    # before: the constant scheduler ignored the warm-up silently (kohya refuses it)
    "warm-up on the constant scheduler": (lambda t: {}, ["--lr_warmup_steps", "5"],
                                          "--lr_warmup_steps (command line) = 5 reaches stage 0"),
    # kohya's ratio form takes floats below 1 only
    "warm-up ratio of 1.5": (lambda t: {"lr_scheduler": "linear"}, ["--lr_warmup_steps", "1.5"],
                             "--lr_warmup_steps (command line) as a float is a fraction"),
    # before: discount 2 trained on noise drowned in its coarse levels, 1e30 on NaN noise (exit 3)
    "pyramid noise discount above 1": (lambda t: {"multires_noise_iterations": 6}, ["--multires_noise_discount", "2"],
                                       "--multires_noise_discount (command line) must be between 0 and 1"),
    # before: a traceback when the stage began (diffusers: lr_end 1e-7 must be smaller than the initial lr)
    "polynomial below its end rate": (lambda t: {"lr_scheduler": "polynomial",
                                                 "stages": [{"kind": "inversion", "steps": 1, "learning_rate": 1e-8}]},
                                      [], "preset: key 'lr_scheduler': stage 0 'inversion0': lr_scheduler 'polynomial'"),
    # before: a traceback at the first sample, after training
    "sample prompt --s beyond the timesteps": (lambda t: {"sample_prompts": _prompts(t, "tok1 --w 32 --h 32 --s 1001")},
                                               [], "line 1: --s must be between 1 and 1000"),
    "sample_steps beyond the timesteps": (lambda t: {"sample_prompts": _prompts(t, "tok1 --w 32 --h 32")},
                                          ["--sample_steps", "5000"], "--sample_steps (command line) must be at most 1000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_option_combination_is_refused_at_start_naming_the_key(case, short, tmp_path, capsys):
    overrides, extra, expected = CASES[case]
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(**overrides(tmp_path)), tmp_path, capsys, extra)
    assert code == 2, seen
    assert expected in seen, seen
    assert "Traceback" not in seen
    _assert_clean(out, before)
    assert not (out / "pti.config.toml").exists() and not (out / "pti.log.jsonl").exists()


def test_a_float_warmup_below_one_is_kohyas_fraction_of_each_stages_steps(preset):
    config = build_config(preset(lr_scheduler="linear", lr_warmup_steps=0.5, stages=[
        {"kind": "inversion", "steps": 4}, {"kind": "lora", "steps": 3, "lr_warmup_steps": 0.34},
        {"kind": "lora", "max_train_epochs": 2}]))
    assert [s.lr_warmup_steps for s in config.stages[:2]] == [2, 1]  # int(0.5 * 4), int(0.34 * 3) as kohya
    assert with_epoch_steps(config, 3).stages[2].lr_warmup_steps == 3  # int(0.5 * 2 epochs x 3 steps)


def test_a_warmup_longer_than_its_stage_is_said(preset, caplog):
    config = build_config(preset(lr_scheduler="constant_with_warmup", lr_warmup_steps=10,
                                 stages=[{"kind": "inversion", "steps": 4}]))
    with_epoch_steps(config, 1)
    assert "stage 0 'inversion0': lr_warmup_steps = 10 is not below its 4 steps" in caplog.text


def test_logging_dir_alone_logs_to_tensorboard_as_kohya_does(preset, tmp_path):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "tb"
    config = build_config(preset(logging_dir=str(logs), stages=[{"kind": "inversion", "steps": 1}]))
    assert config.log_with == "tensorboard"
    Trainer(config).run()
    assert list(logs.rglob("events.out.tfevents.*"))  # before: nothing was logged, and nothing said so
