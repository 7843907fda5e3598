"""The top-level dataset keys a kohya ``dataset_config`` overrides in every dataset or subset (kohya: the dataset
config wins over the command line and the preset).

The preset's top-level dataset keys (``resolution``, ``shuffle_caption``, ``keep_tokens``, ``flip_aug``, ...,
``alpha_mask``, and ``train_batch_size`` as the datasets' ``batch_size``) are the defaults of ``[general]``
(``data/dataset.py``). Where every dataset (a dataset key) or every subset (a subset key) sets its own value, the
top-level one trains nowhere: :func:`with_dataset_config_values` names a value the user gave (preset, kohya
``config_file``, command line or ``--set``) that differs, with where it came from and the levels that win, and,
when one value wins everywhere, takes it into the resolved config, so the run's records (``<output_name>.config.toml``,
``modelspec.resolution``) say what trained. The file's own problems are left to
``data/dataset.py``, which reports them when it reads the file for training.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any, Callable

from .config import Config, ConfigError, _check_type, toml_literal
from .data.dataset_keys import DATASET_KEYS, SUBSET_KEYS, SUBSET_ONLY_KEYS, TOP_LEVEL_KEYS
from .input_checks import with_leading_dot
from .text_files import read_toml_file

logger = logging.getLogger(__name__)

#: A top-level key -> the dataset_config key of the same meaning.
FILE_KEYS = {key: key for key in TOP_LEVEL_KEYS} | {"train_batch_size": "batch_size", "alpha_mask": "alpha_mask"}

#: (general, [(dataset's own keys, [subset tables])]): a dataset_config's levels.
_Levels = tuple[dict[str, Any], list[tuple[dict[str, Any], list[dict[str, Any]]]]]


def _levels(path: Path) -> _Levels | None:
    """``path``'s ``[general]`` and ``[[datasets]]`` (each with its ``[[datasets.subsets]]``), or None where the file
    cannot be read so (reported when ``data/dataset.py`` reads it)."""
    try:
        raw = read_toml_file(path)
    except (OSError, ValueError):
        return None
    general, datasets = raw.get("general", {}), raw.get("datasets", [])
    if not (isinstance(general, dict) and isinstance(datasets, list) and all(isinstance(d, dict) for d in datasets)):
        return None
    levels = [({k: v for k, v in d.items() if k != "subsets"}, d.get("subsets", [])) for d in datasets]
    if not all(isinstance(subsets, list) and all(isinstance(s, dict) for s in subsets) for _, subsets in levels):
        return None
    return general, levels


#: Subset keys also read at their dataset's level: the dataset's ``resize_interpolation`` resizes its masks.
_ALSO_A_DATASETS = ("resize_interpolation",)


def _winners(levels: _Levels, key: str) -> tuple[str, list[tuple[str, Any]]] | None:
    """(what reads ``key``: ``"dataset"``, ``"subset"``, ``"dataset and subset"``; [(the level that sets it, its
    value)] for each of them), the innermost level winning as in ``data/dataset.py``; None when one of them takes the
    top-level value, or none exists."""
    general, datasets = levels
    found: list[tuple[str, Any]] = []
    for d, (own, subsets) in enumerate(datasets):
        outer = [(f"datasets.{d}", own), ("[general]", general)]
        chains = [outer] if key in DATASET_KEYS or key in _ALSO_A_DATASETS else []
        if key not in DATASET_KEYS:
            chains += [[(f"datasets.{d}.subsets.{s}", subset)] + (outer if key not in SUBSET_ONLY_KEYS else [])
                       for s, subset in enumerate(subsets)]
        for chain in chains:
            won = next(((where, table[key]) for where, table in chain if key in table), None)
            if won is None:
                return None
            found.append(won)
    unit = "dataset" if key in DATASET_KEYS else "dataset and subset" if key in _ALSO_A_DATASETS else "subset"
    return (unit, found) if found else None


def _normal(key: str) -> Callable[[Any], Any]:
    """``key``'s value as the dataset reads it (its ``dataset_keys`` check; a leading dot on an extension): to compare
    values written differently (``512`` and ``[512, 512]``)."""
    check = (DATASET_KEYS | SUBSET_KEYS | SUBSET_ONLY_KEYS)[key]
    return (lambda value: with_leading_dot(check(value))) if key == "caption_extension" else check


def with_dataset_config_values(config: Config, sources: dict[str, str]) -> Config:
    """``config`` with each top-level dataset key that its ``dataset_config`` sets in every dataset (or subset) to
    one value replaced by that value; a value the user gave (``sources``: key -> where from) that some such level
    replaces by another is named in a warning."""
    levels = _levels(Path(config.dataset_config)) if config.dataset_config else None
    if levels is None:
        return config
    hints, taken = typing.get_type_hints(Config), {}
    for key, file_key in FILE_KEYS.items():
        won = _winners(levels, file_key)
        try:
            normal = _normal(file_key)
            values = [normal(value) for _, value in won[1]] if won else []
        except ValueError:
            continue
        if not values:
            continue
        if key in sources and any(value != _safely(normal, getattr(config, key)) for value in values):
            _warn(config, key, file_key, won, sources[key])
        if all(value == values[0] for value in values):
            try:
                taken[key] = _check_type(won[1][0][1], hints[key], key)
            except ConfigError:
                pass
    return dataclasses.replace(config, **taken)


def _safely(normal: Callable[[Any], Any], value: Any) -> Any:
    try:
        return normal(value)
    except ValueError:
        return value


def _warn(config: Config, key: str, file_key: str, won: tuple[str, list[tuple[str, Any]]], source: str) -> None:
    unit, found = won
    values = list(dict.fromkeys(toml_literal(value) for _, value in found))
    wheres = dict.fromkeys(f"{where} ({toml_literal(value)})" if len(values) > 1 else where for where, value in found)
    logger.warning("dataset_config %s = %s replaces %s = %s (%s) in every %s: %s of %s %s (kohya: the dataset config "
                   "wins over the command line and the preset)", file_key, " / ".join(values), key,
                   toml_literal(getattr(config, key)), source, unit, ", ".join(wheres), config.dataset_config,
                   "set it" if len(wheres) > 1 else "sets it")
