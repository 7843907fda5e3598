"""What a plugin is, and how discovery and instantiation name the plugin at fault: the README's skeleton trains as
written; a class of the wrong shape, options its own checks refuse, a package that fails to import, and two plugins
claiming one name are all stopped before any model loads, naming ``plugins.NAME`` (and the entry point's
distribution); a plugin is named by its preset table, so two tables never share loss terms."""

from __future__ import annotations

import logging
import re
import sys
import tomllib
from pathlib import Path

import pytest

import pti_plugin.hooks as hooks
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, instantiate_plugins, register_plugin
from pti_plugin.outputs import read_training_log
from pti_plugin.trainer import Trainer

README = Path(__file__).resolve().parents[1] / "README.md"

TWIN = '''
import torch
from pti_plugin.hooks import Plugin

class Twin(Plugin):  # no name: the entry point's name is its name
    def extra_losses(self, state, batch, main, rows):
        return {"zero": torch.zeros((), device=state.device)}
'''

SHAPES = '''
from dataclasses import dataclass
from pti_plugin.hooks import Plugin

class Plain:  # hooks, but not a Plugin
    def __init__(self, options):
        self.options = options
    def on_step_end(self, state, logs):
        pass

class LooseOptions(Plugin):
    class Options:  # not a dataclass
        weight = 1.0

class HalfSchedule(Plugin):
    def plan_stage(self, state, stage):
        raise AssertionError("not called")

class Picky(Plugin):
    @dataclass
    class Options:
        level: int = 1
        def __post_init__(self):
            if self.level > 3:
                raise ValueError(f"level must be <= 3, got {self.level}")

    def __init__(self, options):
        super().__init__(options)
        if options.level < 0:
            raise TypeError("level: a count, not a debt")

class NoOptionsArgument(Plugin):
    def __init__(self):
        pass
'''


@pytest.fixture
def registry(monkeypatch):
    """A registry of this test's own: what it registers is gone afterwards (the built-ins stay built in)."""
    monkeypatch.setattr(hooks, "_REGISTERED", {})
    monkeypatch.setattr(hooks, "_WARNED", set(), raising=False)
    return hooks._REGISTERED


def _install(site: Path, dist: str, entries: dict[str, str], modules: dict[str, str] | None = None) -> None:
    """A distribution ``dist`` (version 1.0) declaring ``entries`` under the plugin group, with ``modules`` beside it,
    as an installed package would be."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[{hooks.ENTRY_POINT_GROUP}]\n{lines}")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)


def _site(tmp_path, monkeypatch, name: str = "site") -> Path:
    site = tmp_path / name
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def _config(tmp_path, plugins):
    return build_config({"train_data_dir": str(tmp_path), "plugins": plugins})


def _readme_block(pattern: str) -> str:
    match = re.search(pattern, README.read_text(), re.S)
    assert match, f"README has no block {pattern!r}"
    return match.group(1)


def test_readme_skeleton_trains_as_written_named_by_its_table(preset, tmp_path, monkeypatch, registry):
    """The README's skeleton, exec'd verbatim and registered, trains 2 inversion steps: its term is exactly 0 at the
    first step (the pivot is its init) and lr^2 at the second (Adam's first step moves each element by
    lr * |g| / (|g| + eps), lr to 1e-3 here; pivot_norm "free" leaves it there), its log line is there, and its own check stops a negative weight
    naming the table. Two tables naming one nameless class (entry points twin_a, twin_b) keep both terms."""
    namespace: dict = {"__name__": "readme_skeleton"}
    skeleton = _readme_block(r"<!-- snippet: plugin-skeleton -->\s*```python\n(.*?)```")
    exec(compile(skeleton, "README.md", "exec", dont_inherit=True), namespace)  # verbatim, without this file's __future__
    register_plugin(namespace["PivotDrift"])
    pyproject = tomllib.loads(_readme_block(r'```toml\n(\[project\.entry-points\."pti_plugin\.plugins"\]\n.*?)```'))
    assert pyproject["project"]["entry-points"][hooks.ENTRY_POINT_GROUP]["pivot_drift"].endswith(":PivotDrift")
    _install(_site(tmp_path, monkeypatch), "twins-demo", {"twin_a": "s39_twin:Twin", "twin_b": "s39_twin:Twin"},
             {"s39_twin": TWIN})
    lr = 5e-2
    raw = preset(pivot_norm="free", plugins={"pivot_drift": {"weight": 1.0}, "twin_a": {}, "twin_b": {}},
                 stages=[{"name": "inversion", "kind": "inversion", "steps": 2, "learning_rate": lr}])
    with pytest.raises(ConfigError, match=re.escape(
            "preset: key 'plugins.pivot_drift' (PivotDrift) refused its options: weight must be >= 0, got -1.0")):
        build_config(raw | {"plugins": {"pivot_drift": {"weight": -1.0}}})
    config = build_config(raw)
    Trainer(config).run()
    log = read_training_log(Path(config.output_dir) / "pti.log.jsonl")
    assert [e["global_step"] for e in log] == [1, 2]
    assert log[0]["loss/pivot_drift/drift"] == 0.0
    assert log[1]["loss/pivot_drift/drift"] == pytest.approx(lr ** 2, rel=1e-3)
    assert [e["pivot_drift/weight"] for e in log] == [1.0, 1.0]
    assert all(e["loss/twin_a/zero"] == 0.0 and e["loss/twin_b/zero"] == 0.0 for e in log)
    assert not [k for e in log for k in e if k.startswith("loss//")]


def test_only_used_entry_points_load_and_a_failing_one_is_named(tmp_path, monkeypatch, registry):
    """A package whose module is missing does not touch runs that do not name it, is listed among the available
    names without being imported, and stops a run that names it with its entry point and distribution."""
    _install(_site(tmp_path, monkeypatch), "broken-demo", {"broken": "s39_no_such_module:Broken"})
    assert [p.name for p in instantiate_plugins(_config(tmp_path, {}))] == ["staged_schedule", "pivot_norm"]
    with pytest.raises(ConfigError, match=r"unknown plugin 'brokn'. Did you mean 'broken'\? Available: broken, "):
        instantiate_plugins(_config(tmp_path, {"brokn": {}}))
    with pytest.raises(ConfigError) as error:
        instantiate_plugins(_config(tmp_path, {"broken": {}}))
    assert error.value.key == "plugins.broken"
    assert str(error.value) == ("preset: key 'plugins.broken': entry point broken = s39_no_such_module:Broken "
                                "(distribution broken-demo 1.0) failed to load: ModuleNotFoundError: No module named "
                                "'s39_no_such_module'")


@pytest.mark.parametrize("name, expected", [
    ("plain", "entry point plain = s39_shapes:Plain (distribution shapes-demo 1.0): <class 's39_shapes.Plain'> is "
              "not a subclass of pti_plugin.hooks.Plugin"),
    ("loose", "LooseOptions.Options is not a dataclass"),
    ("half", "HalfSchedule has plan_stage but no trains: a schedule has both"),
], ids=["not_a_plugin", "options_not_a_dataclass", "half_a_schedule"])
def test_a_class_of_the_wrong_shape_is_refused_up_front(tmp_path, monkeypatch, registry, name, expected):
    _install(_site(tmp_path, monkeypatch), "shapes-demo", {"plain": "s39_shapes:Plain", "loose": "s39_shapes:LooseOptions",
                                                          "half": "s39_shapes:HalfSchedule"}, {"s39_shapes": SHAPES})
    with pytest.raises(ConfigError, match=re.escape(f"preset: key 'plugins.{name}': ")) as error:
        instantiate_plugins(_config(tmp_path, {name: {}}))
    assert expected in str(error.value) and error.value.key == f"plugins.{name}"


def test_value_and_type_errors_of_a_plugins_own_checks_name_its_table(tmp_path, monkeypatch, registry):
    _install(_site(tmp_path, monkeypatch), "shapes-demo", {"picky": "s39_shapes_b:Picky",
                                                          "bare": "s39_shapes_b:NoOptionsArgument"},
             {"s39_shapes_b": SHAPES})
    refused = "preset: key 'plugins.{}' ({}) refused its options: {}"
    for plugins, message in [({"picky": {"level": 4}}, refused.format("picky", "Picky", "level must be <= 3, got 4")),
                             ({"picky": {"level": -1}}, refused.format("picky", "Picky", "level: a count, not a debt")),
                             ({"bare": {}}, refused.format("bare", "NoOptionsArgument", ""))]:
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            instantiate_plugins(_config(tmp_path, plugins))
        assert error.value.key == f"plugins.{next(iter(plugins))}"
    assert instantiate_plugins(_config(tmp_path, {"picky": {"level": 3}}))[-1].options.level == 3


def test_one_name_one_plugin(tmp_path, monkeypatch, registry, caplog):
    """Two tables naming one nameless class are two plugins named by their tables; register_plugin refuses a
    built-in's name, a taken name and no name (the same class again is fine); a third-party entry point named like
    a built-in or a registered plugin is ignored with a warning naming it (never imported); two third-party entry
    points of one name stop the run that names it, naming both."""
    site = _site(tmp_path, monkeypatch)
    _install(site, "twins-demo", {"twin_a": "s39_twin_b:Twin", "twin_b": "s39_twin_b:Twin",
                                  "pivot_norm": "s39_no_such_module:Impostor", "dup": "s39_no_such_module:One",
                                  "mine": "s39_no_such_module:Shadowed"},
             {"s39_twin_b": TWIN})
    _install(_site(tmp_path, monkeypatch, "site2"), "other-demo", {"dup": "s39_no_such_module:Two"})  # first on sys.path
    with caplog.at_level(logging.WARNING):
        plugins = instantiate_plugins(_config(tmp_path, {"twin_a": {}, "twin_b": {}}))
    assert [p.name for p in plugins] == ["staged_schedule", "pivot_norm", "twin_a", "twin_b"]
    assert type(plugins[1]).__module__ == "pti_plugin.plugins.pivot_norm"
    assert ("plugins.pivot_norm: entry point pivot_norm = s39_no_such_module:Impostor (distribution twins-demo 1.0) "
            "is ignored: 'pivot_norm' is the built-in plugin pti_plugin.plugins.pivot_norm:PivotNorm") in caplog.text
    with pytest.raises(ConfigError, match=re.escape(
            "preset: key 'plugins.dup': two installed plugins have this name, dup = s39_no_such_module:Two "
            "(distribution other-demo 1.0) and dup = s39_no_such_module:One (distribution twins-demo 1.0)")):
        instantiate_plugins(_config(tmp_path, {"dup": {}}))

    class Impostor(Plugin):
        name = "pivot_norm"

    class Mine(Plugin):
        name = "mine"

    class AlsoMine(Plugin):
        name = "mine"

    with pytest.raises(ValueError, match="'pivot_norm' is the built-in plugin pti_plugin.plugins.pivot_norm:PivotNorm"):
        register_plugin(Impostor)
    register_plugin(Mine)
    register_plugin(Mine)  # the same class again: a re-run cell
    with caplog.at_level(logging.WARNING):
        assert type(instantiate_plugins(_config(tmp_path, {"mine": {}}))[-1]) is Mine
    assert ("plugins.mine: entry point mine = s39_no_such_module:Shadowed (distribution twins-demo 1.0) is ignored: "
            "'mine' is the plugin given to register_plugin") in caplog.text
    with pytest.raises(ValueError, match=r"'mine' is registered to .*Mine; choose another name"):
        register_plugin(AlsoMine)
    with pytest.raises(ValueError, match=r"name = ''; a plugin's name is its preset table's"):
        register_plugin(type("Nameless", (Plugin,), {}))
    assert registry == {"mine": Mine}


def test_a_script_s_plugin_imported_and_also_run_as_main_registers_once(tmp_path, registry, monkeypatch):
    """A benchmark script imported as a module by one caller and run as ``__main__`` by another (runpy) defines its
    plugin class twice, from one file: the second registration replaces the first; a class of that name from another
    file, imported under another module name, is still refused."""
    import importlib.util
    import runpy

    source = ("from pti_plugin.hooks import Plugin, register_plugin\n\n\n@register_plugin\nclass Clock(Plugin):\n"
              "    name = 'script_clock'\n")

    def imported(path: Path, module_name: str) -> None:
        path.parent.mkdir(exist_ok=True)
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module_name, module)  # imported, as a test imports a benchmark
        spec.loader.exec_module(module)

    imported(tmp_path / "bench_script.py", "bench_script")
    with pytest.raises(ValueError, match="'script_clock' is registered to bench_script:Clock"):
        imported(tmp_path / "other" / "bench_script.py", "other_script")
    runpy.run_path(str(tmp_path / "bench_script.py"), run_name="__main__")
    assert registry["script_clock"].__module__ == "__main__"
