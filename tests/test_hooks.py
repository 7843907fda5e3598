"""Plugin discovery and options: built-ins, entry points, validation, the single schedule plugin."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import pti_plugin.hooks as hooks
from pti_plugin.config import ConfigError, doc
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, instantiate_plugins


class ExternalPlugin(Plugin):
    name = "external_demo"

    @dataclass
    class Options:
        strength: float = doc("How strong.", 1.0)


class FakeEntryPoint:
    name = "external_demo"

    def load(self):
        return ExternalPlugin


def _config(tmp_path, plugins):
    return build_config({"train_data_dir": str(tmp_path), "plugins": plugins})


def test_entry_point_plugins_are_discovered_with_validated_options(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "entry_points", lambda group: [FakeEntryPoint()] if group == hooks.ENTRY_POINT_GROUP else [])
    plugins = instantiate_plugins(_config(tmp_path, {"external_demo": {"strength": 2}}))
    assert [p.name for p in plugins] == ["staged_schedule", "pivot_norm", "external_demo"]  # the defaults are added
    assert plugins[2].options.strength == 2.0
    with pytest.raises(ConfigError, match="unknown key 'plugins.external_demo.strenght'. Did you mean 'strength'?"):
        instantiate_plugins(_config(tmp_path, {"external_demo": {"strenght": 2}}))


def test_unknown_plugin_names_the_available_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown plugin 'staged_schedul'. Did you mean 'staged_schedule'?"):
        instantiate_plugins(_config(tmp_path, {"staged_schedul": {}}))


def test_only_one_schedule_plugin(tmp_path, monkeypatch):
    class OtherSchedule(Plugin):
        name = "other_schedule"

        def trains(self, state, stage):
            raise AssertionError("not called")

        def plan_stage(self, state, stage):
            raise AssertionError("not called")

    hooks.register_plugin(OtherSchedule)
    with pytest.raises(ConfigError, match="only one schedule plugin may be active"):
        instantiate_plugins(_config(tmp_path, {"staged_schedule": {}, "other_schedule": {}}))
    assert [p.name for p in instantiate_plugins(_config(tmp_path, {"other_schedule": {}}))] == ["pivot_norm", "other_schedule"]
