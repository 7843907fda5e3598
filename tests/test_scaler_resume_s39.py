"""fp16's gradient scaler goes with a saved state: ``scaler.pt`` (accelerate's name and content, the scaler's
``state_dict()``) is written with the state when the run has a scaler and loaded before the resumed run's first step,
so the loss scale continues; a state without one resumes as before (an info line), one with it resumed by a run without
a scaler is warned about naming ``mixed_precision``. No CUDA here: a ``torch.amp.GradScaler("cpu")`` stands in."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .conftest import make_preset
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.resume import load_state, read_progress, save_state
from pti_plugin.trainer import Trainer

PLAIN_FILES = ["lr_scheduler.pt", "optimizer.pt", "progress.json", "trainable.safetensors"]


def _stepped_scaler() -> torch.amp.GradScaler:
    """A scaler that has taken a step with an infinite gradient (its scale 1024 halved to 512) and then 3 finite ones
    (its growth tracker 3, of 2000 before it grows)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for factor in (float("inf"), 1.0, 1.0, 1.0):
        optimizer.zero_grad()
        scaler.scale((weight * factor).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return scaler


def _state(folder: Path, scaler: dict | None) -> Path:
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0], "name": "pivot"}]}
    return save_state(folder, {"pivot.vectors": torch.ones(1, 8)}, optimizer, {"last_epoch": 1}, 0, 1, 1,
                      stage_kind="inversion", optimizer_type="AdamW", param_groups=[("pivot", 1)], scaler=scaler)


def _load(folder: Path, scaler) -> torch.nn.Parameter:
    pivot = torch.nn.Parameter(torch.zeros(1, 8))
    load_state(read_progress(folder), {"pivot.vectors": pivot}, scaler)
    return pivot


def test_the_scaler_state_is_saved_as_scaler_pt_and_a_resume_continues_its_loss_scale(tmp_path, caplog):
    saved = _stepped_scaler()
    assert (saved.get_scale(), saved._get_growth_tracker()) == (512.0, 3)  # torch's rule, by hand: backoff 0.5 once
    state = _state(tmp_path / "pti-state-step00000001", saved.state_dict())
    assert sorted(p.name for p in state.iterdir()) == sorted(PLAIN_FILES + ["scaler.pt"])
    assert torch.load(state / "scaler.pt") == {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                               "growth_interval": 2000, "_growth_tracker": 3}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written in the temporary folder, renamed
    fresh = torch.amp.GradScaler("cpu")  # the resumed run's, at torch's initial 65536
    with caplog.at_level(logging.INFO, logger="pti_plugin.resume"):
        assert _load(state, fresh).tolist() == [[1.0] * 8]
    assert (fresh.get_scale(), fresh._get_growth_tracker()) == (512.0, 3)
    assert "fp16's gradient scaler continues at loss scale 512.0" in caplog.text
    # its next step goes on from there: the tracker counts on, the scale is the saved one
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    fresh.scale(weight.sum()).backward()
    assert weight.grad.tolist() == [512.0, 512.0]  # scaled by the saved scale
    fresh.step(optimizer)
    fresh.update()
    assert (fresh.get_scale(), fresh._get_growth_tracker()) == (512.0, 4)


def test_a_state_without_a_scaler_is_the_plain_four_files_and_resumes_a_scaler_afresh_with_an_info_line(tmp_path, caplog):
    state = _state(tmp_path / "pti-state-step00000001", None)  # bf16, fp32 or a CPU run: no scaler
    assert sorted(p.name for p in state.iterdir()) == PLAIN_FILES
    assert sorted(json.loads((state / "progress.json").read_text())) == [
        "global_step", "optimizer_type", "param_groups", "rules", "stage_index", "stage_kind", "stage_step"]
    with caplog.at_level(logging.INFO, logger="pti_plugin.resume"):
        _load(state, None)  # a run without a scaler: nothing said
        assert caplog.text == ""
        scaler = torch.amp.GradScaler("cpu")
        _load(state, scaler)  # an fp16 run resuming an older state, or one saved without fp16
    assert (scaler.get_scale(), scaler._get_growth_tracker()) == (65536.0, 0)
    assert "holds no gradient scaler state (scaler.pt" in caplog.text and "starts afresh at 65536.0" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_state_with_a_scaler_resumed_by_a_run_without_one_is_warned_about_naming_mixed_precision(tmp_path, caplog):
    state = _state(tmp_path / "pti-state-step00000001", _stepped_scaler().state_dict())
    with caplog.at_level(logging.WARNING, logger="pti_plugin.resume"):
        assert _load(state, None).tolist() == [[1.0] * 8]  # the weights still load
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"state {state} holds fp16's gradient scaler state (scaler.pt)" in warning
    assert 'resume with mixed_precision = "fp16"' in warning


@pytest.mark.parametrize("content", [{}, [512.0], {"scale": 512.0}], ids=["empty", "list", "partial"])
def test_a_broken_scaler_pt_is_refused_naming_key_resume_and_the_file(tmp_path, content):
    state = _state(tmp_path / "pti-state-step00000001", _stepped_scaler().state_dict())
    torch.save(content, state / "scaler.pt")
    pivot = torch.nn.Parameter(torch.zeros(1, 8))
    with pytest.raises(ConfigError, match=r"key 'resume': .*scaler\.pt: not a gradient scaler state"):
        load_state(read_progress(state), {"pivot.vectors": pivot}, torch.amp.GradScaler("cpu"))


@register_plugin
class CpuScalerPlugin(Plugin):
    """Gives the run a CPU gradient scaler (on a GPU fp16 gives it one), starting at ``init_scale``; records its
    state at the end."""

    name = "test_cpu_scaler"
    ends: list = []

    @dataclass
    class Options:
        init_scale: float = 65536.0

    def on_setup(self, state):
        state.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=self.options.init_scale)

    def on_end(self, state):
        CpuScalerPlugin.ends.append(state.accelerator.scaler.state_dict())


def test_a_run_with_a_scaler_saves_it_with_its_state_and_its_resume_loads_it_before_the_first_step(tiny_model,
                                                                                                  tiny_dataset, tmp_path):
    """The trainer's wiring: the accelerator's scaler goes into the state folder and comes back on resume."""
    raw = make_preset(tiny_model, tiny_dataset, tmp_path / "run", train_batch_size=1, save_state=True,
                      plugins={"test_cpu_scaler": {"init_scale": 1024.0}},
                      stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}])
    CpuScalerPlugin.ends = []
    Trainer(build_config(raw)).run()
    state = tmp_path / "run" / "pti-state-step00000001"
    assert torch.load(state / "scaler.pt")["_growth_tracker"] == 1 and torch.load(state / "scaler.pt")["scale"] == 1024.0
    # resumed with a scaler that would start at 8 and a stage one step longer: it goes on from the saved 1024, step 2
    Trainer(build_config(raw | {"output_dir": str(tmp_path / "resumed"), "resume": str(state), "save_state": False,
                                "plugins": {"test_cpu_scaler": {"init_scale": 8.0}},
                                "stages": [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}]})).run()
    assert [(end["scale"], end["_growth_tracker"]) for end in CpuScalerPlugin.ends] == [(1024.0, 1), (1024.0, 2)]
