"""kohya's scheduler options: lr_scheduler_type / lr_scheduler_args, lr_decay_steps, lr_scheduler_timescale,
lr_scheduler_min_lr_ratio and the scheduler names kohya takes from transformers and diffusers.

Every expected rate is worked out here by hand from the schedule's published definition, at chosen numbers."""

from __future__ import annotations

import math
import re

import pytest
import torch

from pti_plugin.cli import parse_args
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.resolution import resolved_dict, with_epoch_steps
from pti_plugin.trainer import Trainer

LR = 0.04


@register_plugin
class LrRecorder(Plugin):
    """The rate of every parameter group as each optimizer step uses it: (stage index, stage step) -> rates."""

    name = "test_lr_recorder"
    rates: dict = {}

    def on_step_start(self, state, batch):
        LrRecorder.rates[(state.stage_index, state.stage_step)] = [g["lr"] for g in state.plan.optimizer.param_groups]


def _stage(tmp_path, index=0, **keys):
    """Stage ``index`` of a config with ``keys`` (top-level and ``stages``) resolved, no model needed."""
    return build_config({"train_data_dir": str(tmp_path)} | keys).stages[index]


def _rates(stage, steps: int) -> list[float]:
    """The rate at stage steps 0 .. ``steps`` of ``stage``'s schedule, built as the trainer builds it."""
    from pti_plugin.lr_schedulers import build_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=stage.learning_rate)
    scheduler = build_lr_scheduler(stage, optimizer)
    rates = []
    for _ in range(steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_with_min_lr_ends_at_its_ratio(tmp_path):
    stage = _stage(tmp_path, stages=[{"kind": "inversion", "steps": 10, "learning_rate": LR,
                                      "lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 0.1}])
    rates = _rates(stage, 10)
    # lr x (0.1 + 0.9 x (1 + cos(pi x step / 10)) / 2): step 0 the full rate, step 5 half-way, step 10 the ratio
    assert rates[0] == pytest.approx(0.04)
    assert rates[5] == pytest.approx(0.04 * 0.55)
    assert rates[10] == pytest.approx(0.004)


def test_warmup_stable_decay_has_its_three_phases_from_kohyas_ratios(tmp_path):
    # 10 steps: warm-up 0.2 -> 2 steps, decay 0.4 -> 4 steps, stable the 4 between; decay to 0.2 of the rate
    stage = _stage(tmp_path, lr_scheduler="warmup_stable_decay", lr_warmup_steps=0.2, lr_decay_steps=0.4,
                   lr_scheduler_min_lr_ratio=0.2, stages=[{"kind": "inversion", "steps": 10, "learning_rate": LR}])
    assert (stage.lr_warmup_steps, stage.lr_decay_steps) == (2, 4)
    rates = _rates(stage, 10)
    # warm-up from 0.2 x lr: 0.2 + 0.8 x step / 2; stable: lr; decay: 0.2 + 0.8 x (1 + cos(pi x k / 4)) / 2
    expected = [0.2, 0.6, 1, 1, 1, 1, 1, 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, 0.6,
                0.2 + 0.8 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.2]
    assert rates == pytest.approx([LR * f for f in expected])


def test_inverse_sqrt_and_piecewise_constant_and_args_to_a_named_schedule(tmp_path):
    inverse = _stage(tmp_path, stages=[{"kind": "inversion", "steps": 8, "learning_rate": LR, "lr_scheduler": "inverse_sqrt",
                                        "lr_warmup_steps": 2, "lr_scheduler_timescale": 4}])
    # warm-up step / 2, then lr x sqrt(4 / (step + 4 - 2)): step 2 -> 1, step 6 -> sqrt(1/2), step 8 -> sqrt(0.4)
    assert _rates(inverse, 8)[:3] + _rates(inverse, 8)[6::2] == pytest.approx(
        [0, LR / 2, LR, LR * math.sqrt(0.5), LR * math.sqrt(0.4)])
    piecewise = _stage(tmp_path, stages=[{"kind": "inversion", "steps": 6, "learning_rate": LR,
                                          "lr_scheduler": "piecewise_constant",
                                          "lr_scheduler_args": ["step_rules='1:2,0.5:4,0.25'"]}])
    assert _rates(piecewise, 5) == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 4, LR / 4])
    # kohya passes lr_scheduler_args on to a named schedule: cosine's num_cycles=1 is a whole wave, back up at the end
    cosine = _stage(tmp_path, stages=[{"kind": "inversion", "steps": 4, "learning_rate": LR, "lr_scheduler": "cosine",
                                       "lr_scheduler_args": ["num_cycles=1"]}])
    assert _rates(cosine, 4) == pytest.approx([LR, LR / 2, 0, LR / 2, LR], abs=1e-12)


def test_stage_keys_default_to_the_top_level_ones_and_reload(tmp_path):
    config = build_config({
        "train_data_dir": str(tmp_path), "lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2"],
        "stages": [{"kind": "inversion", "steps": 4},
                   {"kind": "lora", "steps": 6, "lr_scheduler_type": "", "lr_scheduler_args": [],
                    "lr_scheduler": "warmup_stable_decay", "lr_decay_steps": 0.5, "lr_scheduler_min_lr_ratio": 0.5},
                   {"kind": "lora", "steps": 4, "lr_scheduler_args": ["step_size=3", "gamma=0.5"]}]})
    assert [(s.lr_scheduler_type, s.lr_scheduler_args, s.lr_scheduler, s.lr_decay_steps, s.lr_scheduler_min_lr_ratio)
            for s in config.stages] == [("StepLR", ("step_size=2",), "constant", 0, None),
                                        ("", (), "warmup_stable_decay", 3, 0.5),
                                        ("StepLR", ("step_size=3", "gamma=0.5"), "constant", 0, None)]
    assert _rates(config.stages[2], 3) == pytest.approx([1e-4, 1e-4, 1e-4, 5e-5])
    assert build_config(resolved_dict(config)).stages == config.stages  # the resolved TOML trains the same stages


def test_a_run_follows_each_stages_schedule_and_a_resume_continues_it(preset, tmp_path):
    """A torch StepLR (via lr_scheduler_type) in the inversion stage, warmup_stable_decay in the lora stage, read
    from the rates the optimizer steps with; a run resumed from a state saved mid-StepLR goes on with it."""
    full = preset(output_dir=str(tmp_path / "full"), plugins={"test_lr_recorder": {}}, save_every_n_steps=3,
                  save_state=True, lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"], stages=[
                      {"name": "inversion", "kind": "inversion", "steps": 5, "learning_rate": LR},
                      {"name": "lora", "kind": "lora", "steps": 4, "learning_rate": 0.01, "lr_scheduler_type": "",
                       "lr_scheduler_args": [], "lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 1,
                       "lr_decay_steps": 2}])
    LrRecorder.rates = {}
    Trainer(build_config(full)).run()
    uninterrupted = dict(LrRecorder.rates)
    assert [uninterrupted[(0, k)][0] for k in range(5)] == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 4])
    # warm-up 1 step from 0, stable 4 - 1 - 2 = 1 step, then half a cosine over 2 steps: 1, then (1 + cos(pi/2)) / 2
    assert [uninterrupted[(1, k)][0] for k in range(4)] == pytest.approx([0, 0.01, 0.01, 0.005])

    LrRecorder.rates = {}
    state = tmp_path / "full" / "pti-state-step00000003"
    Trainer(build_config(full | {"output_dir": str(tmp_path / "resumed"), "resume": str(state),
                                 "save_every_n_steps": 0})).run()
    assert sorted(LrRecorder.rates) == [(0, 3), (0, 4)] + [(1, k) for k in range(4)]
    assert LrRecorder.rates == {key: uninterrupted[key] for key in LrRecorder.rates}  # lr/2 then lr/4, not lr again


def _refused(tmp_path, raw) -> str:
    with pytest.raises(ConfigError) as info:
        build_config({"train_data_dir": str(tmp_path)} | raw)
    return str(info.value)


@pytest.mark.parametrize("raw, expected", [
    ({"stages": [{"kind": "inversion", "lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size 2"]}]},
     "key 'stages.0.lr_scheduler_args': stage 0 'inversion0': entry 'step_size 2' is not key=value"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=two"]},
     "key 'lr_scheduler_args': stage 0 'inversion': entry 'step_size=two': 'two' is not a Python literal"),
    ({"lr_scheduler_type": "StepLRR"}, "key 'lr_scheduler_type': stage 0 'inversion': 'StepLRR' is not a scheduler class"),
    ({"lr_scheduler_type": "my_package.schedulers.Mine"}, "key 'lr_scheduler_type': stage 0 'inversion': "
                                                          "'my_package.schedulers.Mine' names a module path"),
    ({"lr_scheduler_type": "LambdaLR"}, "key 'lr_scheduler_type': stage 0 'inversion': torch.optim.lr_scheduler.LambdaLR "
                                        "is not supported: it takes a Python function"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2", "gama=0.5"]},
     "key 'lr_scheduler_args': stage 0 'inversion': lr_scheduler_type 'StepLR' takes no argument 'gama'; it takes "
     "step_size, gamma"),
    ({"lr_scheduler_type": "StepLR"}, "key 'lr_scheduler_args': stage 0 'inversion': lr_scheduler_type 'StepLR' needs "
                                      "step_size"),
    ({"lr_scheduler_type": "OneCycleLR", "lr_scheduler_args": ["max_lr=0.1", "total_steps=10"]},
     "key 'lr_scheduler_args': stage 0 'inversion': lr_scheduler_type 'OneCycleLR': Tried to step 11 times"),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": ["num_warmup_steps=5"]},
     "key 'lr_scheduler_args': stage 0 'inversion': num_warmup_steps is set by lr_warmup_steps"),
    ({"stages": [{"kind": "inversion", "lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 1.5}]},
     "key 'stages.0.lr_scheduler_min_lr_ratio' is a fraction of the learning rate and must be between 0 and 1, got 1.5"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": -0.1},
     "key 'lr_scheduler_min_lr_ratio' is a fraction of the learning rate and must be between 0 and 1, got -0.1"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "key 'lr_scheduler_min_lr_ratio': stage 0 'inversion': lr_scheduler "
                                             "'cosine_with_min_lr' needs lr_scheduler_min_lr_ratio"),
    ({"stages": [{"kind": "inversion", "lr_scheduler": "warmup_stable_decay"}]},
     "key 'lr_decay_steps': stage 0 'inversion0': lr_scheduler 'warmup_stable_decay' needs lr_decay_steps"),
    ({"lr_scheduler": "piecewise_constant"}, "key 'lr_scheduler_args': stage 0 'inversion': lr_scheduler "
                                             "'piecewise_constant' needs step_rules"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 2,
      "stages": [{"kind": "inversion", "steps": 5, "lr_decay_steps": 4}]},
     "key 'stages.0.lr_decay_steps': stage 0 'inversion0': lr_warmup_steps 2 + lr_decay_steps 4 exceed the stage's 5 steps"),
    ({"lr_decay_steps": 1.5}, "key 'lr_decay_steps' as a float is a fraction of the stage's steps"),
    ({"lr_scheduler": "cosine", "stages": [{"kind": "inversion", "lr_decay_steps": 10}]},
     "key 'stages.0.lr_decay_steps' = 10 reaches stage 0 'inversion0', whose lr_scheduler 'cosine' does not use it"),
    ({"lr_scheduler": "linear", "lr_scheduler_timescale": 5},
     "key 'lr_scheduler_timescale' = 5 reaches stage 0 'inversion', whose lr_scheduler 'linear' does not use it"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2"], "lr_warmup_steps": 3},
     "key 'lr_warmup_steps' = 3 reaches stage 0 'inversion', whose lr_scheduler_type 'StepLR' does not use it"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2"], "lr_scheduler": "cosine"},
     "key 'lr_scheduler' = 'cosine' reaches stage 0 'inversion', whose lr_scheduler_type 'StepLR' replaces it"),
    ({"lr_scheduler": "adafactor:1e-3"}, "key 'lr_scheduler': scheduler 'adafactor:1e-3' is not supported by "
                                         "pti-plugin: kohya's adafactor:<lr> only reports the rate Adafactor sets"),
    ({"stages": [{"kind": "inversion", "lr_scheduler": "reduce_lr_on_plateau"}]},
     "key 'stages.0.lr_scheduler': scheduler 'reduce_lr_on_plateau' is not supported by pti-plugin: it follows a "
     "validation metric"),
])
def test_a_bad_schedule_setting_is_refused_naming_its_key_and_stage(tmp_path, raw, expected):
    assert expected in _refused(tmp_path, raw)


def test_an_epoch_stage_whose_decay_does_not_fit_is_refused_once_its_length_is_known(tmp_path):
    config = build_config({"train_data_dir": str(tmp_path), "lr_scheduler": "warmup_stable_decay", "stages": [
        {"kind": "inversion", "max_train_epochs": 2, "lr_warmup_steps": 3, "lr_decay_steps": 0.5}]})
    assert with_epoch_steps(config, 10).stages[0].lr_decay_steps == 10  # int(0.5 x 2 epochs x 10 steps)
    with pytest.raises(ConfigError, match=re.escape(
            "key 'lr_decay_steps': stage 0 'inversion0': lr_warmup_steps 3 + lr_decay_steps 2 exceed the stage's 4 "
            "steps (2 epoch(s) of 2 step(s))")):
        with_epoch_steps(config, 2)


def test_kohyas_percent_ratio_on_the_command_line():
    _, overrides, _ = parse_args(["--lr_warmup_steps", "10%", "--lr_decay_steps", "25%", "--lr_scheduler_args",
                                  "step_size=2", "gamma=0.5"])
    assert overrides == {"lr_warmup_steps": 0.1, "lr_decay_steps": 0.25, "lr_scheduler_args": ["step_size=2", "gamma=0.5"]}


def test_a_schedule_that_needs_momentum_is_refused_at_start_for_an_optimizer_without_it(tmp_path):
    """CyclicLR cycles the momentum by default; over Adafactor (neither momentum nor betas) torch raises as the stage
    begins. Checked on a throw-away SGD, it passed the start-up checks and the run died at the lora stage, after the
    inversion stage had trained, with nothing saved."""
    cyclic = {"lr_scheduler_type": "CyclicLR", "lr_scheduler_args": ["base_lr=0.001", "max_lr=0.01"]}
    stages = [{"kind": "inversion", "steps": 2}, {"kind": "lora", "steps": 2, "optimizer_type": "Adafactor"}]
    message = _refused(tmp_path, cyclic | {"stages": stages})
    assert "key 'lr_scheduler_args': stage 1 'lora1'" in message and "momentum" in message, message
    assert build_config({"train_data_dir": str(tmp_path)} | cyclic | {"stages": stages[:1]}).stages[0]  # AdamW: betas


def test_a_stages_own_scheduler_class_replaces_the_top_level_schedule_the_other_stages_use(tmp_path):
    """A top-level lr_scheduler that one stage replaces with its own lr_scheduler_type used to be refused with
    "leave one of the two out", which the other stages could not follow; given together in one place it still is."""
    stages = [{"kind": "inversion", "steps": 4, "lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2"]},
              {"kind": "lora", "steps": 4}]
    config = build_config({"train_data_dir": str(tmp_path), "lr_scheduler": "cosine", "stages": stages})
    lr = config.stages[0].learning_rate
    assert _rates(config.stages[0], 4) == pytest.approx([lr, lr, lr * 0.1, lr * 0.1, lr * 0.01])  # StepLR's gamma 0.1
    assert [config.stages[0].lr_scheduler_type, config.stages[1].lr_scheduler_type] == ["StepLR", ""]
    assert _rates(config.stages[1], 4)[2] == pytest.approx(config.stages[1].learning_rate * 0.5)  # cosine's middle
    message = _refused(tmp_path, {"lr_scheduler": "cosine", "lr_scheduler_type": "StepLR",
                                  "lr_scheduler_args": ["step_size=2"]})
    assert "key 'lr_scheduler' = 'cosine' reaches stage 0" in message, message
