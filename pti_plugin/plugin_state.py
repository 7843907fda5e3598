"""A plugin's own state across a resume (a counter, a cache it built, a running mean): what its ``state_dict()``
returns is saved in the state folder with the trainer's state, and given back to its ``load_state_dict()`` when the
run resumes, before ``on_setup`` (Lightning callbacks' and HF ``TrainerCallback`` states are the models).

In the state folder, ``plugins.json`` holds per plugin (by its preset name) ``{"values": {...}, "tensors": [...]}``:
the JSON values of its state and the names of its tensors, which ``plugins.safetensors`` holds as ``<plugin>/<key>``.
They are written into the state's temporary folder with the rest (:func:`~.resume.save_state`), so a state folder
holds every plugin's state of that step or none, and only when a plugin returned one: a state folder without them was
saved by a run none of whose plugins kept a state, or by a version before plugins could.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic_io import atomic_write_bytes, atomic_write_text
from .config import ConfigError

logger = logging.getLogger(__name__)

VALUES, TENSORS = "plugins.json", "plugins.safetensors"


@dataclass
class PluginStates:
    """The plugins' states as a state folder holds them: ``entries`` per plugin name ``{"values": {...}, "tensors":
    [keys]}``, ``tensors`` by ``<plugin>/<key>`` (CPU copies, taken when the state was saved)."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        """``plugins.json`` (and ``plugins.safetensors`` when a plugin's state holds tensors) into ``folder``;
        nothing when no plugin keeps a state."""
        from safetensors.torch import save

        if not self.entries:
            return
        if self.tensors:
            atomic_write_bytes(folder / TENSORS, save(self.tensors))
        atomic_write_text(folder / VALUES, json.dumps(self.entries))

    def of(self, name: str) -> dict[str, Any]:
        """Plugin ``name``'s state as its ``state_dict()`` returned it (tensors on the CPU)."""
        entry = self.entries[name]
        return dict(entry["values"]) | {key: self.tensors[f"{name}/{key}"] for key in entry["tensors"]}


def _json_problem(key: str, value: Any) -> str | None:
    """Why ``value`` (at ``key``) cannot be saved as JSON and read back unchanged; None when it can."""
    try:
        if json.loads(json.dumps(value, allow_nan=False)) == value:
            return None
    except (TypeError, ValueError):
        pass
    return (f"its value {key!r} ({type(value).__name__}) is neither a tensor nor a JSON value that reads back "
            "unchanged (numbers, strings, booleans, None, and lists and string-keyed tables of them)")


def _checked(state: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | str:
    """A ``state_dict()`` result split into its JSON values and CPU copies of its tensors, or why it cannot be saved."""
    from safetensors.torch import save

    if not isinstance(state, dict):
        return f"its state_dict() returned a {type(state).__name__}, not a dict (or None for no state)"
    values, tensors = {}, {}
    for key, value in state.items():
        if not isinstance(key, str):
            return f"its state_dict() has the key {key!r}, not a string"
        if not isinstance(value, torch.Tensor):
            if problem := _json_problem(key, value):
                return problem
            values[key] = value
            continue
        try:  # a copy of its own (tensors sharing storage cannot be saved), checked by writing it
            tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
            save({key: tensors[key]})
        except Exception as exc:  # noqa: BLE001 (meta, sparse, a dtype safetensors does not store: named)
            return f"its tensor {key!r} cannot be saved ({type(exc).__name__}: {exc})"
    return values, tensors


def collect_plugin_states(plugins: list) -> PluginStates:
    """Each plugin's ``state_dict()``, at a save with a state (main process). None: the plugin keeps no state. A
    plugin whose ``state_dict()`` raises or returns what cannot be saved as it is (see :func:`_checked`) is warned
    about, naming it, and the state is saved without its entry (a resume from it starts that plugin afresh): the
    run's files are not lost for it."""
    states = PluginStates()
    for plugin in plugins:
        name = plugin.name
        try:
            state = plugin.state_dict()
            checked = None if state is None else _checked(state)
        except Exception as exc:  # noqa: BLE001 (a plugin's own error: named, the state saved without it)
            checked = f"its state_dict() raised {type(exc).__name__}: {exc}"
        if checked is None:
            continue
        if isinstance(checked, tuple) and any(f"{name}/{key}" in states.tensors for key in checked[1]):
            checked = "its tensor names clash with another plugin's in plugins.safetensors"
        if isinstance(checked, str):
            logger.warning(f"plugin {name!r}: its state is not saved with this state ({checked}); a resume from this "
                           "state starts it afresh")
            continue
        values, tensors = checked
        states.entries[name] = {"values": values, "tensors": list(tensors)}
        states.tensors |= {f"{name}/{key}": tensor for key, tensor in tensors.items()}
    return states


def read_plugin_states(folder: Path) -> PluginStates | None:
    """The plugins' states ``folder`` (a state folder) holds; None when it holds none. A broken file is refused
    naming it (``key 'resume'``), before anything loads."""
    from .safe_load import load_safetensors

    path = folder / VALUES
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"key 'resume': {path} is not valid JSON ({exc})") from None
    if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("values"), dict) and isinstance(e.get("tensors"), list)
            and all(isinstance(k, str) for k in e["tensors"]) for e in entries.values()):
        raise ConfigError(f"key 'resume': {path} must hold, per plugin, {{\"values\": {{...}}, \"tensors\": [names]}}")
    wanted = [f"{name}/{key}" for name, entry in entries.items() for key in entry["tensors"]]
    if wanted and not (folder / TENSORS).is_file():
        raise ConfigError(f"key 'resume': {folder} is missing {TENSORS}, which holds the plugins' tensors {path} names")
    try:
        tensors = load_safetensors(folder / TENSORS, wanted) if wanted else {}
    except ValueError as exc:
        raise ConfigError(f"key 'resume': {exc}") from None
    return PluginStates(entries, tensors)


def resume_plugins(state, progress, plugins: list) -> None:
    """On a resume (``progress``: the state's :class:`~.resume.SavedProgress`; nothing without one), before
    ``on_setup``: ``state``'s position is the saved one (``stage``, ``stage_index``, ``stage_step``, ``global_step``),
    and each of ``plugins`` whose state the folder holds gets it in its ``load_state_dict()``, exactly as its
    ``state_dict()`` returned it (tensors on the CPU). A plugin that loads a state (overrides ``load_state_dict``) and
    has none there (the state was saved by a run without it, or before it kept one) is not called, and a line says
    that it starts afresh; a saved state of a plugin this run does not enable is warned about, naming it. A
    ``load_state_dict()`` that raises is refused naming the plugin."""
    from .hooks import Plugin, trainer_progress

    if progress is None:
        return
    position = trainer_progress(state)  # read-only to plugins
    position.stage, position.stage_index = state.config.stages[progress.stage_index], progress.stage_index
    position.stage_step, position.global_step = progress.stage_step, progress.global_step
    folder, saved = progress.folder, progress.plugins
    entries = saved.entries if saved is not None else {}
    for plugin in plugins:
        if plugin.name in entries:
            try:
                plugin.load_state_dict(saved.of(plugin.name))
            except Exception as exc:  # noqa: BLE001 (a plugin's own error: named, before anything trains)
                raise ConfigError(f"key 'resume': plugin {plugin.name!r} could not load its state saved in {folder} "
                                  f"({type(exc).__name__}: {exc}); resume with the version of the plugin that saved "
                                  "it") from exc
        elif getattr(type(plugin), "load_state_dict", None) not in (None, Plugin.load_state_dict):
            state.info(f"resume: state {folder} holds no state of plugin {plugin.name!r} (saved by a run without it, "
                       "or before it kept one): it starts afresh")
    enabled = {plugin.name for plugin in plugins}
    for name in entries:
        if name not in enabled:
            logger.warning(f"resume: state {folder} holds the state of plugin {name!r}, which this run does not enable: "
                           f"it is left unused (enable the plugin, [plugins.{name}], to continue it)")
