"""A plugin's own state across a resume: ``state_dict()`` saved with the state folder, ``load_state_dict()`` given it
back before ``on_setup``, which sees the saved step; a state without the plugin's entry, and an entry of a plugin the
resumed run does not enable."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import make_preset
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import Trainer

NOTE = {"label": "counting", "history": [1, 2.5, None, True]}  # a JSON value of every kind, given back as saved


@register_plugin
class CountingPlugin(Plugin):
    """Counts its steps (an int and a tensor); records the calls a resume makes, in order."""

    name = "test_counting"
    calls: list = []

    def __init__(self, options):
        super().__init__(options)
        self.count, self.total = 0, torch.zeros(2)

    def state_dict(self):
        return {"count": self.count, "total": self.total, "note": NOTE}

    def load_state_dict(self, state_dict):
        CountingPlugin.calls.append(("load", state_dict))
        self.count, self.total = state_dict["count"], state_dict["total"].clone()

    def on_setup(self, state):
        CountingPlugin.calls.append(("setup", state.global_step, state.stage_index, state.stage_step, self.count))

    def on_step_end(self, state, logs):
        self.count += 1
        self.total += 1.5

    def on_end(self, state):
        CountingPlugin.calls.append(("end", self.count, self.total.tolist()))


@pytest.fixture(scope="module")
def counted(tiny_model, tiny_dataset, tmp_path_factory):
    """4 steps of one stage with the counting plugin, a state saved at step 2 (and the final one at 4)."""
    root = tmp_path_factory.mktemp("counted")
    raw = make_preset(tiny_model, tiny_dataset, root / "full", train_batch_size=1, save_every_n_steps=2, save_state=True,
                      plugins={"test_counting": {}}, stages=[{"kind": "inversion", "steps": 4, "learning_rate": 5e-2}])
    CountingPlugin.calls = []
    Trainer(build_config(raw)).run()
    return raw, root, CountingPlugin.calls


def _resume(raw: dict, out: Path, state: Path, plugins: dict) -> list:
    CountingPlugin.calls = []
    Trainer(build_config(raw | {"output_dir": str(out), "resume": str(state), "save_every_n_steps": 0,
                                "save_state": False, "plugins": plugins})).run()
    return CountingPlugin.calls


def test_a_plugin_state_is_saved_beside_the_state_and_given_back_before_on_setup_which_sees_the_saved_step(counted):
    raw, root, calls = counted
    assert calls == [("setup", 0, -1, 0, 0), ("end", 4, [6.0, 6.0])]  # a new run: nothing loaded
    state = root / "full" / "pti-state-step00000002"
    assert json.loads((state / "plugins.json").read_text()) == {
        "test_counting": {"values": {"count": 2, "note": NOTE}, "tensors": ["total"]}}
    assert list(load_file(state / "plugins.safetensors")) == ["test_counting/total"]
    assert load_file(state / "plugins.safetensors")["test_counting/total"].tolist() == [3.0, 3.0]

    calls = _resume(raw, root / "resumed", state, {"test_counting": {}})
    (load, loaded), setup, end = calls
    assert load == "load" and set(loaded) == {"count", "total", "note"}
    assert loaded["count"] == 2 and loaded["note"] == NOTE and torch.equal(loaded["total"], torch.tensor([3.0, 3.0]))
    assert setup == ("setup", 2, 0, 2, 2)  # global step, stage index, stage step, the restored count
    assert end == ("end", 4, [6.0, 6.0])  # counted on from 2: as the uninterrupted run


def test_a_state_without_the_plugins_entry_calls_nothing_and_one_of_a_plugin_not_enabled_is_warned_about(
        counted, tmp_path, capsys, caplog):
    raw, root, _ = counted
    old = tmp_path / "pti-state-step00000002"  # as a run without test_counting, with another plugin, saved it
    shutil.copytree(root / "full" / old.name, old)
    (old / "plugins.safetensors").unlink(missing_ok=True)
    (old / "plugins.json").write_text(json.dumps({"test_gone": {"values": {"n": 1}, "tensors": []}}))
    with caplog.at_level(logging.WARNING):
        calls = _resume(raw, tmp_path / "resumed", old, {"test_counting": {}})
    assert calls == [("setup", 2, 0, 2, 0), ("end", 2, [3.0, 3.0])]  # afresh: no load_state_dict call
    assert f"resume: state {old} holds no state of plugin 'test_counting'" in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if "test_gone" in r.getMessage()] == [
        f"resume: state {old} holds the state of plugin 'test_gone', which this run does not enable: it is left "
        "unused (enable the plugin, [plugins.test_gone], to continue it)"]
