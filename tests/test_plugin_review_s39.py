"""A review of the plugin change (s39): a plugin's refusal of the settings found after the set-up keeps the finished
steps (as its other errors do); a schedule's refused plan names the schedule in the error's ``plugin``; a plugin may
update in ``on_before_save`` a metadata entry its own hooks left in ``state.metadata``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, StagePlan, StageTrains, register_plugin
from pti_plugin.plan_report import PlanError, start_plan
from pti_plugin.plugin_calls import PluginCalls
from pti_plugin.trainer import Trainer


@register_plugin
class Refuser(Plugin):
    """Refuses the settings at the start of stage ``stage`` (a check that needs the stage's plan)."""

    name = "test_v1_refuser"

    @dataclass
    class Options:
        stage: int = 1

    def on_stage_start(self, state):
        if state.stage_index == self.options.stage:
            raise ConfigError.at("plugins.test_v1_refuser.stage", f" = {self.options.stage}: refused at its start")


def test_a_hooks_refusal_after_the_set_up_saves_the_finished_steps(preset, capsys):
    """Before: a ConfigError from a hook after training started stopped the run (exit 2) with nothing saved, so the
    finished stage was lost. Now the last finished step is saved as after a plugin's other errors, and what was saved
    is said above the error, which stays as the plugin raised it (every process of a run says it alike: once)."""
    raw = preset(train_batch_size=1, plugins={"test_v1_refuser": {}},
                 stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 1}])
    with pytest.raises(ConfigError) as error:
        Trainer(build_config(raw)).run()
    assert str(error.value) == "preset: key 'plugins.test_v1_refuser.stage' = 1: refused at its start"
    out = Path(raw["output_dir"])
    state = out / "pti-state-interrupted-step00000001"
    printed = capsys.readouterr().out
    assert ("\nsaved pti-interrupted-step00000001.safetensors, tok1-interrupted-step00000001.safetensors and the state "
            f"{state}\nresume with: ") in printed
    assert printed.rstrip().endswith(f"--resume {state}")
    progress = json.loads((state / "progress.json").read_text())
    assert (progress["stage_index"], progress["stage_step"], progress["global_step"]) == (1, 0, 1)  # lora's start
    assert (out / "pti-interrupted-step00000001.safetensors").is_file()
    assert (out / "tok1-interrupted-step00000001.safetensors").is_file()


def _plan_state(name: str = "own_schedule"):
    stage = SimpleNamespace(name="lora", index=1)
    return SimpleNamespace(schedule=SimpleNamespace(name=name), stage=stage, stage_index=1), stage


@pytest.mark.parametrize("groups, said", [
    ([{"lr": 0.1}], "param_groups[0] has no \"name\""),
    ([{"lr": 0.1, "name": "mine"}, {"lr": 0.2, "name": "mine"}], "two parameter groups share a name (['mine', 'mine'])"),
])
def test_a_refused_plan_names_the_schedule_as_the_failing_plugin(groups, said):
    """Before: the loop over the groups reused the schedule's name's variable, so the PlanError's ``plugin`` was the
    last group's name (None for a group without one, 'mine' for a shared name) instead of the schedule's."""
    state, stage = _plan_state()
    groups = [group | {"params": [torch.zeros(1, requires_grad=True)]} for group in groups]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    plan = StagePlan(stage, 1, groups, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                     lora_enabled=True, trains=StageTrains(pivot=False, unet_lora=True, text_encoder_lora=False))
    with pytest.raises(PlanError) as error:
        start_plan(state, plan)
    assert said in str(error.value)
    assert (error.value.plugin, error.value.hook) == ("own_schedule", "plan_stage")


class _Counting(Plugin):
    """Leaves ``pti_<name>_count`` in ``state.metadata`` after each step, and sets ``key`` again before each save."""

    def __init__(self, name: str, key: str):
        self.name, self.key, self.count = name, key, 0

    def on_step_end(self, state, logs):
        self.count += 1
        state.metadata[f"pti_{self.name}_count"] = str(self.count)

    def on_before_save(self, state, files):
        files["metadata"][self.key] = "at save"


def test_a_plugin_may_update_its_own_state_metadata_entry_before_a_save():
    """Before: a plugin's ``on_before_save`` that updated an entry its own ``on_step_end`` had left in
    ``state.metadata`` was dropped with a warning saying another plugin or state.metadata had set it. Its own entry
    is its to write; another plugin's still is not."""
    state = SimpleNamespace(stage=None, stage_index=0, stage_step=0, global_step=0, logs={}, metadata={})
    calls = PluginCalls([_Counting("a", "pti_a_count"), _Counting("b", "pti_a_count")], state)
    calls.each("on_step_end", {})
    # a's own entry updated by a; b's change of a's entry dropped; b's own entry kept as its step left it
    assert calls.save_metadata(set()) == {"pti_a_count": "at save", "pti_b_count": "1"}
