"""The trainer's calls of the plugins' hooks, through one place, and the checks of what the hooks return or leave.

:class:`PluginCalls` calls each hook (:class:`~pti_plugin.hooks.Plugin`); an exception a hook raises becomes a
:class:`PluginError` naming the plugin (its preset name), the hook and where the run was (stage, step), with the
plugin's own frames of the traceback kept (``plugin_traceback``, and the exception chained). The trainer catches it
as it catches a non-finite loss: the last finished step is saved with its state (``RunOutputs.save_after_plugin_error``)
and the command that resumes it is printed. A :class:`~pti_plugin.config.ConfigError` a hook raises is a refusal of
the settings and passes as it is (exit 2); after ``on_setup`` the trainer saves the last finished step for it too,
saying so above the error (:attr:`PluginCalls.refused_in` names the hook).

What the hooks hand back is checked where the trainer takes it, with a few attribute reads: ``extra_losses``' terms
(0-dim floating tensors on the main loss's device) and ``extra_rows``' rows (latents, timesteps and conditioning
that fit the step's main rows) stop the run with a :class:`PluginError` saying what came back; entries a plugin
leaves in ``state.logs`` (numbers; a 0-dim tensor or a numpy number is converted) or in ``state.metadata`` and
``files["metadata"]`` (``pti_*`` keys, string values, none of the trainer's or of another plugin's) are checked
right after the hook that left them, and one that breaks the contract is dropped with a warning naming the
plugin: a log or a metadata entry never stops a run or loses its files. ``on_before_save`` is the one hook whose
exception does not stop the run either: the plugin's entries are left out of that save, with a warning.
"""

from __future__ import annotations

import logging
import numbers
import reprlib
import traceback
from typing import Any

import torch

from .config import ConfigError
from .hooks import Plugin, TrainerState, UNetRows

logger = logging.getLogger(__name__)


_NUMBERS = (float, int)  # a log value taken as it is


class PluginError(RuntimeError):
    """A plugin's hook raised, or handed back what the plugin contract does not allow. ``plugin``: its preset name;
    ``hook``: the hook; ``plugin_traceback``: the plugin's own frames of the exception it raised ("" for a returned
    value); ``saved``: what the trainer saved after it and how to go on (set by the trainer, shown after the message)."""

    def __init__(self, message: str, plugin: str = "", hook: str = "", plugin_traceback: str = ""):
        super().__init__(message)
        self.plugin, self.hook, self.plugin_traceback, self.saved = plugin, hook, plugin_traceback, ""

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message}\n{self.saved}" if self.saved else message


def plugin_name(plugin: Any) -> str:
    """The name a message gives ``plugin``: its ``name`` (the preset's ``[plugins.NAME]``), else its class's."""
    return getattr(plugin, "name", "") or type(plugin).__name__


def where(state: TrainerState, hook: str) -> str:
    """Where the run was when ``hook`` ran (the trainer's message of a non-finite step says it so too)."""
    if hook == "on_setup":
        return "during the set-up, before the first step"
    if hook == "on_end":
        return "after the final save"
    stage = f"stage {state.stage_index} ({state.stage.name!r})" if state.stage is not None else "the first stage"
    if hook in ("plan_stage", "on_stage_start"):
        return f"at the start of {stage}"
    if hook == "on_stage_end":
        return f"at the end of {stage}"
    if hook in ("on_step_end", "on_before_save"):
        return f"after {stage}, step {state.stage_step} (global step {state.global_step})"
    return f"at {stage}, step {state.stage_step + 1} (global step {state.global_step + 1})"


def describe(value: Any) -> str:
    """A short account of a value a hook handed back (a tensor's shape, dtype and device)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}, {str(value.dtype).removeprefix('torch.')}, on {value.device}"
    return f"a {type(value).__name__} ({reprlib.repr(value)})"


def log_number(value: Any) -> float | int | None:
    """``value`` as a log's number: an int or float as it is, a 0-dim tensor or a numpy number converted;
    None for anything else."""
    if type(value) in (float, int, bool):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 and not value.is_complex() else None
    return float(value) if isinstance(value, numbers.Real) else None


class PluginCalls:
    """The run's plugins (in the order they run), called hook by hook with ``state`` (see the module docstring)."""

    def __init__(self, plugins: list[Plugin], state: TrainerState):
        self.plugins, self.state = plugins, state
        self._log_owners: dict[str, str] = {}  # a state.logs key -> the plugin whose hook left it first
        self._metadata_owners: dict[str, str] = {}  # the same for state.metadata
        self._warned: set[str] = set()  # the warnings said (each once, unless said otherwise)
        self.refused_in: str | None = None  # the hook whose ConfigError passed (the trainer saves after it too)

    # ------------------------------------------------------------------ calls
    def call(self, plugin: Plugin, hook: str, *args: Any) -> Any:
        """``plugin.<hook>(state, *args)``; an exception it raises becomes a :class:`PluginError` (a ConfigError
        passes); then the entries it left in ``state.logs``/``state.metadata`` are checked."""
        state = self.state
        try:
            returned = getattr(plugin, hook)(state, *args)
        except ConfigError:
            self.refused_in = hook
            raise
        except PluginError:
            raise
        except Exception as exc:
            raise self.raised(plugin, hook, exc) from exc
        if state.logs or state.metadata:
            self._check_left(plugin, hook)
        return returned

    def each(self, hook: str, *args: Any) -> None:
        """``hook`` of every plugin, in order."""
        for plugin in self.plugins:
            self.call(plugin, hook, *args)

    def raised(self, plugin: Any, hook: str, exc: BaseException) -> PluginError:
        """The :class:`PluginError` for ``exc``, raised in ``plugin``'s ``hook``; its traceback from the hook down."""
        frames = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # below PluginCalls.call
        text = "".join(traceback.format_exception(type(exc), exc, frames))
        name = plugin_name(plugin)
        return PluginError(f"plugin {name!r} failed in {hook} {where(self.state, hook)}: {type(exc).__name__}: {exc}",
                           name, hook, text)

    def returned(self, plugin: Plugin, hook: str, what: str) -> PluginError:
        """The :class:`PluginError` for a value ``plugin``'s ``hook`` handed back that breaks the contract."""
        name = plugin_name(plugin)
        return PluginError(f"plugin {name!r}'s {hook} {where(self.state, hook)} returned {what}", name, hook)

    # ------------------------------------------------------------------ what the step's hooks return
    def rows(self, batch, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> list[tuple[Plugin, UNetRows]]:
        """Each plugin's ``extra_rows`` that it returned (not None), checked against the step's main rows: ``noisy``
        [b, 4, h, w], ``timesteps`` [b], ``cond`` (a ``Conditioning`` of b rows)."""
        out = []
        for plugin in self.plugins:
            rows = self.call(plugin, "extra_rows", batch)
            if rows is not None:
                problem = rows_problem(rows, noisy, timesteps, cond)
                if problem:
                    raise self.returned(plugin, "extra_rows", problem)
                out.append((plugin, rows))
        return out

    def losses(self, terms: dict[str, torch.Tensor], batch, main, row_outputs: dict[int, torch.Tensor]) -> None:
        """Each plugin's ``extra_losses`` into ``terms`` as ``<plugin name>/<term>``: each a 0-dim floating tensor on
        the device of ``terms["main"]``, under a name no other term has."""
        device = terms["main"].device
        for plugin in self.plugins:
            returned = self.call(plugin, "extra_losses", batch, main, row_outputs.get(id(plugin)))
            if not isinstance(returned, dict):
                raise self.returned(plugin, "extra_losses", f"{describe(returned)}, not a dict of loss terms")
            for name, value in returned.items():
                key = f"{plugin.name}/{name}"
                if (not isinstance(value, torch.Tensor) or value.dim() or not value.is_floating_point()
                        or value.device != device or not isinstance(name, str) or not name or key in terms):
                    raise self.returned(plugin, "extra_losses", term_problem(name, value, key, key in terms, device))
                terms[key] = value

    # ------------------------------------------------------------------ what hooks leave in the state
    def _check_left(self, plugin: Plugin, hook: str) -> None:
        """After ``plugin``'s ``hook``: a log entry that is not a number is converted (a 0-dim tensor, a numpy number)
        or dropped, a metadata entry that is not a ``pti_*`` string dropped, each with a warning naming the plugin.
        An entry seen before with a good value costs a type check and a look-up."""
        logs, metadata = self.state.logs, self.state.metadata
        owners = self._log_owners
        new = [key for key, value in logs.items() if type(value) not in _NUMBERS or key not in owners]
        for key in new:
            value = logs[key]
            number = log_number(value) if isinstance(key, str) else None
            if number is None:
                del logs[key]
                self._warn(plugin, hook, f"state.logs[{key!r}] = {describe(value)}: a log entry must be a number "
                           "(float, int, a 0-dim tensor) under a string key; it is dropped")
                continue
            owners.setdefault(key, plugin_name(plugin))
            if number is not value:
                logs[key] = number
        owners = self._metadata_owners
        for key in [key for key, value in metadata.items() if type(value) is not str or key not in owners]:
            problem = metadata_problem(key, metadata[key])
            if problem:
                del metadata[key]
                self._warn(plugin, hook, f"state.metadata[{key!r}]: {problem}; it is dropped")
            else:
                owners.setdefault(key, plugin_name(plugin))

    def logged(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The plugins' ``state.logs`` for a logged step whose trainer entries are ``entry``: a key of the trainer's
        is left out (its value stays the trainer's), with a warning naming the plugin that set it."""
        logs = self.state.logs
        clash = logs.keys() & entry.keys()
        for key in sorted(clash):
            self._warn(self._log_owners.get(key, "a plugin"), "state.logs",
                       f"{key!r} is one of the trainer's own log keys: the plugin's value is not logged (the "
                       "trainer's is); a plugin's keys begin with its name, '<name>/...'")
        return {k: v for k, v in logs.items() if k not in clash} if clash else logs

    def save_metadata(self, reserved: set[str]) -> dict[str, str]:
        """The plugins' ``pti_*`` metadata for a save: ``state.metadata``, then what each plugin's ``on_before_save``
        adds to ``files["metadata"]``, checked right after its hook. An entry that is not a ``pti_*`` string, one of
        the trainer's own keys (``reserved``) or another plugin's is dropped, and a hook that raises has its entries
        left out, each with a warning naming the plugin: the save goes on."""
        metadata = {}
        for key, value in self.state.metadata.items():
            if key in reserved:
                self._warn(self._metadata_owners.get(key, "a plugin"), "state.metadata",
                           f"{key!r} is one of the trainer's own metadata keys: the plugin's value is not saved")
            else:
                metadata[key] = value
        files: dict[str, Any] = {"metadata": metadata}
        for plugin in self.plugins:
            before = dict(files["metadata"])
            try:
                plugin.on_before_save(self.state, files)
            except Exception as exc:
                self._warn(plugin, "on_before_save", f"raised {type(exc).__name__}: {exc}; its metadata is left out "
                           "of this save", once=False)
                files["metadata"] = before
                continue
            if self.state.logs or self.state.metadata:
                self._check_left(plugin, "on_before_save")
            files["metadata"] = self._checked_additions(plugin, before, files.get("metadata"), reserved)
        return files["metadata"]

    def _checked_additions(self, plugin: Plugin, before: dict[str, str], after: Any, reserved: set[str]) -> dict[str, str]:
        """``before`` with the entries ``plugin``'s ``on_before_save`` added or changed in ``after`` that are its own
        to write (new keys, and those its own hooks left in ``state.metadata``); each other one is dropped with a
        warning."""
        if not isinstance(after, dict):
            self._warn(plugin, "on_before_save", f'files["metadata"] became {describe(after)}; its entries are left out')
            return before
        checked, name = dict(before), plugin_name(plugin)
        for key, value in after.items():
            if key in before and before[key] == value:
                continue
            problem = metadata_problem(key, value) or (
                "one of the trainer's own metadata keys" if key in reserved else
                "set before this plugin's hook, by another plugin, and kept"
                if key in before and self._metadata_owners.get(key) != name else "")
            if problem:
                self._warn(plugin, "on_before_save", f'files["metadata"][{key!r}]: {problem}; the entry is dropped')
            else:
                checked[key] = value
        return checked

    def _warn(self, plugin: Any, hook: str, message: str, once: bool = True) -> None:
        """A warning naming ``plugin`` (a plugin or a name) and ``hook``, said once per message unless not ``once``."""
        name = plugin if isinstance(plugin, str) else plugin_name(plugin)
        text = f"plugin {name!r} ({hook}): {message}" if name != "a plugin" else f"a plugin ({hook}): {message}"
        if once and text in self._warned:
            return
        self._warned.add(text)
        logger.warning("%s", text)


def term_problem(name: Any, value: Any, key: str, taken: bool, device: torch.device) -> str:
    """What is wrong with the loss term ``name`` of ``extra_losses`` (``key``: its name among the step's terms;
    ``taken``: another term has that name)."""
    if not isinstance(name, str) or not name:
        return f"a loss term named {name!r}: a term's name must be a non-empty string"
    if taken:
        return f"the loss term {name!r}, but the step has a term {key!r} already: each term needs a name of its own"
    return (f"the loss term {name!r} as {describe(value)}: a term must be a 0-dim floating tensor on {device} (the "
            "main loss's device)")


def metadata_problem(key: Any, value: Any) -> str:
    """Why a plugin's metadata entry cannot be saved ("" when it can): kohya's LoRA metadata holds strings, and a
    plugin's keys begin with ``pti_``."""
    if not isinstance(key, str) or not key.startswith("pti_"):
        return "a plugin's metadata key must be a string beginning with 'pti_'"
    if not isinstance(value, str):
        return f"the value is {describe(value)}: metadata values are strings (json.dumps(...) a structure)"
    return ""


def rows_problem(rows: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> str:
    """What is wrong with ``rows`` from ``extra_rows`` ("" if nothing) against the step's main rows: latents of the
    main rows' shape after the first dimension, dtype and device, r timesteps on their device, conditioning of r rows
    shaped and placed as the main rows' (its ``added_cond_kwargs`` typed as theirs too)."""
    if not isinstance(rows, UNetRows):
        return f"{describe(rows)}, not pti_plugin.hooks.UNetRows or None"
    latents, conditioning = rows.noisy_latents, rows.conditioning
    if not isinstance(latents, torch.Tensor) or latents.dim() != noisy.dim():
        return f"noisy_latents as {describe(latents)}; expected [r, {', '.join(map(str, noisy.shape[1:]))}]"
    checks = [("noisy_latents", latents, noisy, True), ("timesteps", rows.timesteps, timesteps, False),
              ("conditioning.hidden_states", getattr(conditioning, "hidden_states", None), cond.hidden_states, False)]
    extra = getattr(conditioning, "added_cond_kwargs", None)
    if isinstance(extra, dict) and extra.keys() == cond.added_cond_kwargs.keys():
        checks += [(f"conditioning.added_cond_kwargs[{k!r}]", extra[k], v, True) for k, v in cond.added_cond_kwargs.items()]
    r = latents.shape[0]
    for name, value, main, same_dtype in checks:
        expected = [r, *main.shape[1:]]
        if (not isinstance(value, torch.Tensor) or list(value.shape) != expected or value.device != main.device
                or (same_dtype and value.dtype != main.dtype)):
            dtype = f", {str(main.dtype).removeprefix('torch.')}" if same_dtype else ""
            return (f"{name} as {describe(value)}; expected shape {expected}{dtype} on {main.device} "
                    f"({r} row(s), as noisy_latents; the rest as the step's main rows)")
    if not isinstance(extra, dict) or extra.keys() != cond.added_cond_kwargs.keys():
        return (f"a conditioning with added_cond_kwargs keys {sorted(extra) if isinstance(extra, dict) else None}; "
                f"expected keys {sorted(cond.added_cond_kwargs)} (a Conditioning as state.encode returns it)")
    return ""
