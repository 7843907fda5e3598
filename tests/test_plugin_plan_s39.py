"""A schedule plugin's plan is what the run states: each stage's start-up line and the saved LoRA's training metadata
say what the plan trained (not the preset's stages); a plan's group without a name is refused naming the schedule;
a learning-rate sweep of a preset with such a schedule warns. The state's counters, plan and config are read-only
for plugins."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

from .conftest import make_preset
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, StagePlan, StageTrains, register_plugin
from pti_plugin.plugin_calls import PluginError
from pti_plugin.trainer import Trainer

# The preset says: inversion 2 steps at 0.05, lora 1 step at 0.01. The schedule plans otherwise (below).
STAGES = [{"name": "inversion", "kind": "inversion", "steps": 2, "learning_rate": 5e-2},
          {"name": "lora", "kind": "lora", "steps": 1, "learning_rate": 1e-2}]


@register_plugin
class OwnSchedule(Plugin):
    """Stage 0: the pivot at 0.02 for 1 step; stage 1: the UNet LoRA at 0.003 for 2 steps (plain AdamW, constant)."""

    name = "test_p3_schedule"

    @dataclass
    class Options:
        unnamed: bool = False  # stage 1's group without "name"

    def trains(self, state, stage):
        return StageTrains(pivot=stage.index == 0, unet_lora=stage.index == 1, text_encoder_lora=False)

    def plan_stage(self, state, stage):
        params, lr = (state.model.pivot_parameters(), 0.02) if stage.index == 0 else (state.model.lora_parameters("unet"), 0.003)
        group = {"params": params, "lr": lr} | ({} if self.options.unnamed and stage.index == 1 else {"name": "mine"})
        optimizer = torch.optim.AdamW([group], lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return StagePlan(stage, 1 if stage.index == 0 else 2, [group], optimizer, scheduler,
                         lora_enabled=stage.index == 1, trains=self.trains(state, stage))


@register_plugin
class Meddler(Plugin):
    """Tries to change what the state shows as read-only, at every step end; records what each try raised."""

    name = "test_p3_meddler"
    tries: list = []

    @dataclass
    class Options:
        pass

    def on_step_end(self, state, logs):
        def attempt(what, change):
            try:
                change()
                Meddler.tries.append((what, None))
            except Exception as exc:  # noqa: BLE001 (recorded)
                Meddler.tries.append((what, type(exc).__name__))

        attempt("global_step", lambda: setattr(state, "global_step", state.global_step + 1))
        attempt("stage_step", lambda: setattr(state, "stage_step", 0))
        attempt("stage_index", lambda: setattr(state, "stage_index", 5))
        attempt("plan", lambda: setattr(state, "plan", None))
        attempt("plan.steps", lambda: setattr(state.plan, "steps", 50))
        attempt("config.plugins", lambda: state.config.plugins.__setitem__("other", {}))
        attempt("config.plugins table", lambda: state.config.plugins["test_p3_meddler"].update(x=1))


@pytest.fixture(scope="module")
def planned(tiny_model, tiny_dataset, tmp_path_factory):
    """One run with the schedule and the meddler (1 + 2 optimizer steps): its printed lines, its LoRA's metadata."""
    out = tmp_path_factory.mktemp("planned") / "out"
    raw = make_preset(tiny_model, tiny_dataset, out, stages=STAGES, train_batch_size=1,
                      plugins={"test_p3_schedule": {}, "test_p3_meddler": {}})
    Meddler.tries = []
    printed = []
    trainer = Trainer(build_config(raw))
    trainer._info = lambda message: printed.append(message)
    lora = trainer.run()["lora"]
    with safe_open(str(lora), "pt") as f:
        metadata = f.metadata()
    log = [json.loads(line) for line in (out / "pti.log.jsonl").read_text().splitlines()]
    return printed, metadata, log, list(Meddler.tries), trainer


def test_the_stage_lines_state_the_schedules_plan(planned):
    printed, _, _, _, trainer = planned
    lines = [line for line in printed if line.startswith("stage ")]
    pivot_size, unet_size = trainer.model.pivots[0].vectors.numel(), sum(p.numel() for p in trainer.model.lora_parameters("unet"))
    assert lines == [
        "stage 0 'inversion' (inversion) as schedule 'test_p3_schedule' plans it: steps=1 trains=['pivot'] "
        f"lora_enabled=False optimizer='AdamW' lr_scheduler='LambdaLR' | params mine {pivot_size} lr=0.02",
        "stage 1 'lora' (lora) as schedule 'test_p3_schedule' plans it: steps=2 trains=['unet_lora'] "
        f"lora_enabled=True optimizer='AdamW' lr_scheduler='LambdaLR' | params mine {unet_size} lr=0.003",
    ]


def test_the_loras_training_metadata_is_the_plans(planned):
    _, metadata, log, _, trainer = planned
    assert [entry["global_step"] for entry in log] == [1, 2, 3]  # 1 + 2 steps, as planned (the preset: 2 + 1)
    expected = {"ss_learning_rate": "0.003", "ss_unet_lr": "0.003", "ss_text_encoder_lr": "None",
                "ss_max_train_steps": "2", "ss_optimizer": "AdamW", "ss_lr_scheduler": "LambdaLR",
                "ss_network_train_unet_only": "True", "pti_inversion_learning_rate": "0.02",
                "pti_inversion_pivot_lr": "0.02", "pti_inversion_max_train_steps": "1",
                "pti_inversion_optimizer": "AdamW", "pti_inversion_lr_scheduler": "LambdaLR"}
    assert {k: metadata.get(k) for k in expected} == expected
    assert "ss_lr_warmup_steps" not in metadata and "pti_inversion_lr_warmup_steps" not in metadata  # the plan has none
    pivot_size, unet_size = trainer.model.pivots[0].vectors.numel(), sum(p.numel() for p in trainer.model.lora_parameters("unet"))
    stage = {"optimizer": "AdamW", "lr_scheduler": "LambdaLR"}
    assert json.loads(metadata["pti_schedule"]) == {"name": "test_p3_schedule", "stages": [
        {"stage": 0, "name": "inversion", "steps": 1, "lora_enabled": False, "learning_rate": 0.02,
         "trains": {"pivot": True, "unet_lora": False, "text_encoder_lora": False},
         "groups": [{"name": "mine", "lr": 0.02, "params": pivot_size, "holds": ["pivot"]}]} | stage,
        {"stage": 1, "name": "lora", "steps": 2, "lora_enabled": True, "learning_rate": 0.003,
         "trains": {"pivot": False, "unet_lora": True, "text_encoder_lora": False},
         "groups": [{"name": "mine", "lr": 0.003, "params": unet_size, "holds": ["unet_lora"]}]} | stage]}


def test_the_counters_plan_and_plugin_tables_are_read_only_for_plugins(planned):
    _, _, log, tries, _ = planned
    refused = {"global_step": "AttributeError", "stage_step": "AttributeError", "stage_index": "AttributeError",
               "plan": "AttributeError", "plan.steps": "FrozenInstanceError", "config.plugins": "TypeError",
               "config.plugins table": "TypeError"}
    assert tries == [item for _ in range(3) for item in refused.items()]  # refused at each of the 3 steps
    assert [(e["stage"], e["stage_step"]) for e in log] == [("inversion", 1), ("lora", 1), ("lora", 2)]


def test_a_group_without_a_name_is_refused_naming_the_schedule_and_the_finished_stage_is_kept(tiny_model, tiny_dataset,
                                                                                               tmp_path):
    out = tmp_path / "out"
    raw = make_preset(tiny_model, tiny_dataset, out, stages=STAGES, train_batch_size=1,
                      plugins={"test_p3_schedule": {"unnamed": True}})
    with pytest.raises(PluginError, match=re.escape(
            "schedule plugin 'test_p3_schedule': its plan of stage 1 ('lora'): param_groups[0] has no \"name\"")):
        Trainer(build_config(raw)).run()
    kept = sorted(p.name for p in out.iterdir() if "interrupted" in p.name)  # stage 0's one step
    assert kept == ["pti-interrupted-step00000001.safetensors", "pti-state-interrupted-step00000001",
                    "tok1-interrupted-step00000001.safetensors"]


def test_a_sweep_of_a_preset_with_its_own_schedule_warns(tiny_model, tiny_dataset, tmp_path, caplog):
    from pti_plugin.sweeps import lr_sweep, plan

    raw = make_preset(tiny_model, tiny_dataset, tmp_path / "out", stages=STAGES, plugins={"test_p3_schedule": {}})
    args = lr_sweep.parse_args(["--preset", "unused.toml", "--stage", "lora", "--lrs", "1e-3,1e-2", "--steps", "2",
                                "--out", str(tmp_path / "sweep"), "--shared_pivot", "off"])
    with caplog.at_level(logging.WARNING):
        plan.plan_runs(args, raw, {})
    warned = [r.getMessage() for r in caplog.records if "staged_schedule" in r.getMessage()]
    assert warned and all(w == warned[0] for w in warned) and warned[0].startswith(
        "the preset's schedule is plugin 'test_p3_schedule', not staged_schedule: the sweep sets each run's lora stage "
        "learning_rate, unet_lr, which reach training only if 'test_p3_schedule''s plan_stage reads them")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the built-in schedule: no warning
        plan.plan_runs(args, raw | {"plugins": {}}, {})
    assert not [r for r in caplog.records if "staged_schedule" in r.getMessage()]
