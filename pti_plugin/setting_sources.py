"""Where each setting comes from: the layers a run's settings are read from, recorded as they apply (:class:`Origins`),
and the start-up lines that name them (:func:`sources_lines`).

The layers, from the lowest: each preset of an ``extends`` chain (the deepest first), a preset's own kohya
``config_file`` beneath that preset, a ``--config_file``, the flags typed, the ``--set`` items. ``config_loading.
load_config`` records each one as it applies it; messages read the same record (a key a kohya config_file gave is
named by its file).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import Config, first_of, toml_literal

#: Each source names at most this many of its settings in the start-up line, and at most this many replaced values are
#: named (the rest counted).
NAMED_SETTINGS = 6
#: A value longer than this is shortened to its end (a path's file name) in the start-up lines.
VALUE_CHARS = 40

_ABSENT = object()


class Origins(dict):
    """key -> ``"config_file <path>"`` for each top-level key a kohya config_file set and no preset above it replaced
    (the source error messages name; a key absent is a preset's or the command line's), and :attr:`layers`: each
    setting's dotted path (``network_dim``, ``plugins.pivot_locality.weight``, ``stages.1.learning_rate``) -> each
    (source, value) that set it, in the order the layers applied (source: ``preset <path>``, ``config_file <path>``,
    ``command line``, ``--set``); :attr:`sources`: the layers in that order; :attr:`final`: the settings once every
    layer applied."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, list[tuple[str, Any]]] = {}
        self.sources: list[str] = []  # in the order they applied
        self.final: dict[str, Any] = {}

    def record(self, values: dict[str, Any], source: str, before: dict[str, Any] | None = None) -> None:
        """The layer ``source`` sets ``values`` (a table's keys each a path of its own; a dotted key is a ``--set``
        path). ``before``: the settings beneath it, where a path's earlier value may lie inside a value recorded whole
        (``stages.1.learning_rate`` inside a preset's ``stages``)."""
        self.sources.append(source)
        for path, value in _leaves(values, ""):
            if path not in self.layers and before is not None and _at(before, path) is not _ABSENT:
                self.layers[path] = [(self._source_of(path), _at(before, path))]
            self.layers.setdefault(path, []).append((source, value))
        if source.startswith("config_file "):
            self.update(dict.fromkeys(values, source))
        elif source.startswith("preset "):
            for key in values:
                self.pop(key, None)

    def _source_of(self, path: str) -> str:
        """The latest source of the longest recorded path that holds ``path``."""
        parts = path.split(".")
        for end in range(len(parts) - 1, 0, -1):
            layers = self.layers.get(".".join(parts[:end]))
            if layers:
                return layers[-1][0]
        return "default"


def sources_lines(origins: Origins) -> list[str]:
    """The start-up lines of ``origins``: each setting not at its default, grouped by the source that gave it (the
    layers' order, at most :data:`NAMED_SETTINGS` named each), and, where a layer replaced an earlier one's value,
    each value in turn with its source (``network_dim 16 (preset sd15_base.toml) -> 32 (config_file gui.toml)``)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(Config)}
    groups: dict[str, list[str]] = {}
    replaced = []
    for path, layers in origins.layers.items():
        value = _at(origins.final, path)
        if value is _ABSENT:  # left out since (a data source another layer replaced)
            continue
        if not (path in defaults and _same(value, defaults[path])):
            groups.setdefault(layers[-1][0], []).append(f"{path} = {_shown(value)}")
        steps = [layers[0]] + [now for before, now in zip(layers, layers[1:]) if not _same(now[1], before[1])]
        if len(steps) > 1:
            steps[-1] = (steps[-1][0], value)
            replaced.append(f"{path} " + " -> ".join(f"{_shown(v)} ({_label(source)})" for source, v in steps))
    named = [f"{_label(source)}: {first_of(groups.pop(source), NAMED_SETTINGS)}" for source in origins.sources
             if source in groups]
    lines = [f"settings from {'; '.join(named)}"] if named else []
    return lines + ([f"replaced: {first_of(replaced, NAMED_SETTINGS, '; ')}"] if replaced else [])


def _leaves(values: dict[str, Any], prefix: str):
    """(dotted path, value) of each value of ``values``, a non-empty table's keys each one (a list is one value)."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _at(tree: Any, path: str) -> Any:
    """The value at the dotted ``path`` of ``tree`` (tables by key, lists by index), else ``_ABSENT``."""
    node = tree
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _ABSENT
    return node


def _same(a: Any, b: Any) -> bool:
    """Equal and of one kind (``true`` is not ``1``)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _shown(value: Any) -> str:
    """``value`` as a preset writes it, a list of tables counted, a long one shortened to its end."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"[{len(value)} tables]"
    text = toml_literal(value) if not isinstance(value, dict) else "{}"
    if len(text) <= VALUE_CHARS:
        return text
    quote = '"' if isinstance(value, str) else ""
    return f"{quote}...{text[len(text) - VALUE_CHARS + 3 + len(quote):]}"


def _label(source: str) -> str:
    """A source as the start-up lines name it: a file by its name (``preset light.toml``, ``config_file gui.toml``)."""
    kind, _, path = source.partition(" ")
    return f"{kind} {Path(path).name}" if kind in ("preset", "config_file") and path else source
