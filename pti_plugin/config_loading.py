"""A preset and a command line -> the resolved, checked :class:`~pti_plugin.config.Config`.

:func:`load_config` reads the preset (``config.load_preset_dict``), applies the command line, and hands the raw
dict to :func:`build_config`, which parses it (``config``'s schema), checks it (``config_checks``,
``input_checks``) and resolves every stage (``resolution``): settings are resolved here, once.
:func:`named_where_given` makes an error name the flag the user typed. The schema (``config``) imports none of
these, so every module may take ``Config`` and ``ConfigError`` from it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import typing
from pathlib import Path
from typing import Any

from .config import (EMBEDDED, PATH_KEYS, PATH_LIST_KEYS, Config, ConfigError, StageConfig, _build, _read_kohya_config_file,
                     _type_name, deep_merge, load_preset_dict, parse_value)
from .kohya_config_file import DATA_SOURCES, kohya_file_path, replace_data_source
from .config_checks import (check_stage_schedules, check_the_pivot_is_learned, validate_config, with_kohya_switches,
                            with_kohya_tracker)
from .input_checks import with_leading_dot
from .dataset_config_wins import with_dataset_config_values
from .setting_sources import Origins
from .resolution import (check_given_values_are_used, default_stage_dicts, resolve_stages, warn_rate_reaching_inversion,
                         warn_unreached_intervals)

logger = logging.getLogger(__name__)


def apply_overrides(raw: dict[str, Any], top_level: dict[str, Any], dotted: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with ``--key value`` overrides and ``--set a.b.c=value`` (list indices allowed) applied;
    ``raw`` itself is left as it was (its nested tables and lists too)."""
    out = copy.deepcopy(raw)
    for key, value in top_level.items():
        out[key] = value
    for item in dotted:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = _split_set(item)
        parts = key.split(".")
        node: Any = out
        if parts[0] == "stages" and "stages" not in out:
            out["stages"] = default_stage_dicts(out)
        for i, part in enumerate(parts[:-1]):
            nxt: Any
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):  # "-1" would reach the last element silently
                    raise ConfigError(f"--set {key}: no element {part!r} in {'.'.join(parts[:i])} (indices 0 to "
                                      f"{len(node) - 1})")
                nxt = node[int(part)]
            elif isinstance(node, dict):
                if part not in node and not _takes_a_table(parts[:i + 1]):  # a key the preset leaves unset
                    raise _not_a_table(key, parts[:i + 1], _UNSET)
                nxt = node.setdefault(part, {})
            else:
                raise _not_a_table(key, parts[:i], node)
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            raise ConfigError(f"--set {key}: cannot set a whole list element")
        if not isinstance(node, dict):
            raise _not_a_table(key, parts[:-1], node)
        node[last] = parse_value(text)
    return out


def _declared_type(parts: list[str]) -> Any:
    """The type the schema declares for the dotted path ``parts`` (a top-level key, or ``stages.N.key``); None for
    another path (a plugin's option) or an unknown key (named as such when the config is built)."""
    if len(parts) == 1:
        return typing.get_type_hints(Config).get(parts[0])
    if len(parts) == 3 and parts[0] == "stages":
        return typing.get_type_hints(StageConfig).get(parts[2])
    return None


def _takes_a_table(parts: list[str]) -> bool:
    """Whether ``--set`` may make ``parts`` a table: the schema declares one there, or declares nothing."""
    declared = _declared_type(parts)
    return declared is None or any(kind is dict or typing.get_origin(kind) is dict
                                   for kind in typing.get_args(declared) or (declared,))


_UNSET = object()  # a key the preset leaves out


def _not_a_table(key: str, parts: list[str], value: Any) -> ConfigError:
    """``--set key`` goes below ``parts``, which is not a table: the message names what it holds (``value``, or
    unset) and the type the schema declares there, the same whether the preset sets it or not."""
    declared = _declared_type(parts)
    takes = f" (it takes {_type_name(declared)})" if declared is not None else ""
    holds = "unset" if value is _UNSET else repr(value)
    return ConfigError(f"--set {key}: {'.'.join(parts)} is {holds}, not a table{takes}")


def build_config(raw: dict[str, Any], check_paths: bool = True, given: dict[str, str] | None = None, *,
                 data_only: bool = False, warn_intervals: bool = True) -> Config:
    """Validate and resolve ``raw`` into a frozen :class:`Config`; raise ConfigError naming the first bad key.

    ``given`` (key -> "preset"/"command line"/"--set"/"config_file <path>"): top-level values the user wrote; one
    that no stage uses is an error (a warning for a kohya config_file's); a dataset key that the ``dataset_config``
    sets in every dataset or subset (``dataset_config_wins``; without ``given``, each key of ``raw`` counts as the
    preset's) is named in a warning where it differs, and one value winning everywhere is taken into the config.
    ``data_only`` (a tool that loads no model: the dataset preview): the model, the starting files, a state, the
    prompts and the output folders are neither looked for nor read. Stages
    resolve here (``resolution.py``); an epoch-based stage's step count follows once the dataset is
    scanned (:func:`pti_plugin.resolution.with_epoch_steps`). A save or sample interval longer than the
    run is a warning (:func:`pti_plugin.resolution.warn_unreached_intervals`), unless ``warn_intervals`` is off (a
    sweep planning its runs: each run warns as it starts) or ``data_only``.
    """
    if "stages" not in raw:
        raw = raw | {"stages": default_stage_dicts(raw)}
    parsed = with_kohya_tracker(with_kohya_switches(_build(Config, raw), raw, check_paths=check_paths and not data_only))
    validate_config(parsed, check_paths, data_only)
    parsed = _with_dims_from_weights(parsed, read=check_paths and not data_only)
    config = dataclasses.replace(parsed, stages=resolve_stages(parsed),
                                 caption_extension=with_leading_dot(parsed.caption_extension),
                                 network_alpha=parsed.network_alpha or float(parsed.network_dim))  # kohya: 0 is dim
    config = with_dataset_config_values(config, dict.fromkeys(raw, "preset") if given is None else given)
    if given:
        check_given_values_are_used(config, parsed.stages, given)
        warn_rate_reaching_inversion(config, parsed.stages, given)
    check_stage_schedules(parsed, config)
    check_the_pivot_is_learned(config)
    if check_paths and warn_intervals and not data_only:  # a config to run now (not a saved run's, read back)
        warn_unreached_intervals(config)
    return config


def _with_dims_from_weights(parsed: Config, read: bool) -> Config:
    """kohya's ``dim_from_weights``: ``network_dim``, ``network_alpha`` and ``network_args`` (LoCon's conv_dim and
    conv_alpha, else none) from the ``network_weights`` file's ``lora_down`` shapes and alphas
    (``formats.kohya_lora.lora_file_dims``), replacing the preset's, so the resolved config shows the dims trained.
    Only when ``read`` (a run's file, checked by then): the tensors the check read (``checked_files.peek``), left for
    the trainer; a saved run's config read back already holds the file's dims."""
    if not parsed.dim_from_weights:
        return parsed
    if not parsed.network_weights:
        raise ConfigError.at("dim_from_weights", " needs network_weights (the kohya LoRA file to take the dims from)")
    if not read:
        return parsed
    from .checked_files import peek
    from .formats.kohya_lora import LoraFormatError, load_lora, lora_file_dims

    try:
        dims = lora_file_dims(parsed.network_weights, peek(parsed.network_weights, lambda path: load_lora(path)[0]))
    except LoraFormatError as exc:
        raise ConfigError.at("dim_from_weights", f": network_weights {exc}") from None
    conv = [f"conv_dim={dims['conv_dim']}", f"conv_alpha={dims['conv_alpha']!r}"] if "conv_dim" in dims else []
    kept = [a for a in parsed.network_args if a.partition("=")[0].strip() not in ("conv_dim", "conv_alpha")]  # dropouts
    taken = dataclasses.replace(parsed, network_dim=dims["network_dim"], network_alpha=dims["network_alpha"],
                                network_args=conv + kept)
    logger.info("dim_from_weights: network_dim = %d, network_alpha = %r, network_args = %s from %s (the preset's: %d, "
                "%r, %s)", taken.network_dim, taken.network_alpha, conv, parsed.network_weights, parsed.network_dim,
                parsed.network_alpha, parsed.network_args)
    return taken


def _check_one_data_source(raw: dict[str, Any], given: dict[str, str]) -> None:
    """Both data sources left at one layer (the presets, one command line): refused naming where each came from."""
    if all(raw.get(key) for key in DATA_SOURCES):
        both = ", ".join(f"{key} = {raw[key]!r} ({given.get(key, 'preset')})" for key in DATA_SOURCES)
        raise ConfigError(f"set only one of 'train_data_dir' and 'dataset_config', got {both}. One a kohya config_file "
                          "or the command line gives replaces the other one beneath it; to drop one that a preset "
                          "extends, write it empty in yours (e.g. train_data_dir = \"\")")


def load_config(preset: str | Path | None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None,
                *, data_only: bool = False, sources: Origins | None = None) -> Config:
    """The resolved config of ``preset`` (or the defaults) with command-line overrides applied.

    Besides :func:`build_config`'s checks, a top-level value given in the preset or on the command
    line (a flag or a ``--set``) that no stage uses (every stage sets its own) is refused, naming the shadowing
    stage keys. ``data_only``: see :func:`build_config`; a config that asks for ``debug_dataset`` is checked as one
    too, as kohya's ``--debug_dataset`` shows the dataset before it looks for the model, the output folder or a device.
    ``sources``, when given, receives where each setting came from, layer by layer (for the start-up lines,
    ``setting_sources.sources_lines``); the messages read the same record.
    """
    overrides = dict(overrides or {})
    origins = Origins() if sources is None else sources
    raw = load_preset_dict(preset, origins=origins) if preset else {}
    if "config_file" in overrides:  # kohya's --config_file: over the preset, beneath the flags typed
        raw = _with_kohya_config_file(raw, overrides.pop("config_file"), origins)
    set_paths = _set_paths(sets or [])
    set_keys = {path.split(".")[-1] for path in set_paths if path.startswith("stages.")}
    top_sets = _top_level_sets(sets or [])
    # a preset value that a --set of the stages shadows is the user's choice, not a forgotten key
    given = {key: origins.get(key, "preset") for key in raw if key not in set_keys} | {  # origins: a kohya config_file's
        key: "command line" for key in overrides} | dict.fromkeys(top_sets, "--set") | {
        path: "--set" for path in set_paths if re.fullmatch(r"stages\.\d+\.learning_rate", path)}
    named = lambda key: f"--set {key}" if key in top_sets else f"--{key}"
    raw = replace_data_source(raw, overrides | top_sets, named, origins)
    origins.record(overrides, "command line")
    origins.record(_set_values(sets or []), "--set", before=raw | overrides)  # the values they replace
    raw = apply_overrides(raw, overrides, sets or [])
    for key in PATH_KEYS:
        value = raw.get(key)
        if isinstance(value, str) and value and value != EMBEDDED:
            raw[key] = str(Path(value).expanduser().resolve())
    for key in PATH_LIST_KEYS:  # each path of a list (base_weights) as the one path of a PATH_KEYS key
        if isinstance(raw.get(key), list):
            raw[key] = [str(Path(v).expanduser().resolve()) if isinstance(v, str) and v else v for v in raw[key]]
    origins.final = raw
    try:
        _check_one_data_source(raw, given)
        return build_config(raw, given=given, data_only=data_only or raw.get("debug_dataset") is True)
    except ConfigError as error:
        raise named_where_given(error, overrides, sets or [], origins) from None


def _with_kohya_config_file(raw: dict[str, Any], name: Any, origins: Origins) -> dict[str, Any]:
    """``raw`` (the preset) with kohya config file ``name`` (``--config_file``) read over it as kohya reads it
    (``kohya_config_file.py``: its relative paths are the current folder's); ``origins`` names the file as the
    source of each key it sets. Its data source replaces the preset's other one, as one typed would."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"--config_file (command line) expects the path of a kohya TOML file, got {name!r}")
    kohya = _read_kohya_config_file(Path(name), base=Path.cwd())
    origin = f"config_file {kohya_file_path(name)}"
    raw = replace_data_source(raw, kohya, lambda key: f"{origin}: {key}", origins)
    origins.record(kohya, origin)
    return deep_merge(raw, kohya)


def named_where_given(error: ConfigError, overrides: dict[str, Any], sets: list[str],
                       origins: dict[str, str] | None = None) -> ConfigError:
    """``error`` about a key the command line gave (its :attr:`~ConfigError.key`), naming the flag the user typed
    instead of the preset: ``--k (command line) ...`` for a flag, ``--set stages.0.k ...`` for a ``--set``, and
    ``command line: ...`` for a refused or unknown key; a key a kohya ``config_file`` gave (``origins``) names
    that file instead of ``preset``; any other error unchanged. An error about a key above a ``--set`` path (``--set
    nokey.x=1``: the unknown key ``nokey``) names that ``--set`` path."""
    if error.key is None:
        return error
    set_path = _set_path_of(error.key, sets)
    if set_path is not None and set_path != error.key:  # the key is a table above the path the --set typed
        return ConfigError(f"--set {set_path}: " + str(error).removeprefix("preset: "), error.key, error.tail)
    if error.key not in overrides and set_path is None:
        origin = (origins or {}).get(error.key)
        text = str(error)
        if origin is None or not text.startswith("preset: "):
            return error
        return ConfigError(f"{origin}: " + text.removeprefix("preset: "), error.key, error.tail)
    if error.tail is None:  # a refused or unknown key: the message is about the key itself
        return ConfigError("command line: " + str(error).removeprefix("preset: "), error.key)
    named = f"--{error.key} (command line)" if error.key in overrides else f"--set {error.key}"
    return ConfigError(named + error.tail, error.key, error.tail)


def _split_set(item: str) -> tuple[str, str]:
    """A ``--set`` item ``path=value`` -> (its dotted path, its value's text): the one reading of an item. The path
    is stripped (``" a.b = 1"`` sets ``a.b``); the value's text is kept as typed (:func:`~pti_plugin.config.parse_value`
    reads a TOML literal around its spaces, ``" 1"`` -> 1; a bare string keeps them)."""
    path, _, text = item.partition("=")
    return path.strip(), text


def _set_paths(sets: list[str]) -> list[str]:
    """The dotted paths of ``--set`` items ``sets`` (``path=value``)."""
    return [_split_set(item)[0] for item in sets]


def _set_values(sets: list[str]) -> dict[str, Any]:
    """The dotted paths ``--set`` items ``sets`` give, each with its (last) value."""
    return {path: parse_value(text) for path, text in (_split_set(item) for item in sets if "=" in item) if path}


def _top_level_sets(sets: list[str]) -> dict[str, Any]:
    """The top-level keys ``--set`` items ``sets`` give (``--set learning_rate=1e-4``), each with its (last) value:
    given on the command line as a flag is."""
    return {path: value for path, value in _set_values(sets).items() if "." not in path}


def _set_path_of(key: str, sets: list[str]) -> str | None:
    """The first ``--set`` path (of ``sets``, ``path=value`` items) that is ``key`` or lies below it, else None."""
    return next((path for path in _set_paths(sets) if path == key or path.startswith(key + ".")), None)
