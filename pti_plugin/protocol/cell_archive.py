"""The committed record of every measured H1 and H3 cell, so that a report never loses finished cells.

The training runs and their parts live in the protocol's working folder (``outputs/protocol``), which is
not committed: a fresh clone, or a machine that lost that folder, has only the results folder. The
report therefore keeps ``h1_cell_records.json`` and ``h3_cell_records.json`` there: the part's null
(H1's base model sampled twice) and every cell exactly as the summaries read them (H3: with the drift
split, the detected cells and the pivot-alone lr-0 cells), i.e. the per-image lists, without images or
presets, and once how they were measured (``measured_with``: the model's digest, the sampling
settings, the training steps). Each rebuild summarises the union of an archive and the working folder
(the working folder wins for a cell in both) and writes it back; cells measured otherwise than the
archive's are refused, so a ``--quick`` or another model's report cannot slip into a committed archive.

Each archived cell also records how it was trained in a form another machine computes alike
(``trained_with``: :func:`trained_with` of its preset), so that ``h1`` and ``h3`` leave a cell the
archive already holds untrained (:func:`left_to_train`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ..atomic_io import atomic_write_text

H1_ARCHIVE = "h1_cell_records.json"
H3_ARCHIVE = "h3_cell_records.json"
#: What a part holds that the summaries do not read (the preset, with this machine's paths; the time; each
#: image's detail size, which only ``analysis/detail_size.py`` reads, from the images).
NOT_ARCHIVED = ("settings", "seconds", "detail_pixels")


def _pivot_cell(path: str) -> str:
    """The H1 cell a pivot file comes from: its run folder's name less the digest of the machine's preset
    (:func:`~.h1_inversion.cell_run_dir`)."""
    return Path(path).parent.name.rsplit("-", 1)[0]


#: Preset keys that hold this machine's paths, and what a fingerprint keeps of each: the model is in
#: ``measured_with`` by its digest; the dataset and the regularisation images are made by code from it.
MACHINE_PATHS: dict[str, Callable[[str], str]] = {
    "pretrained_model_name_or_path": lambda path: "model", "train_data_dir": lambda path: "data",
    "reg_data_dir": lambda path: "regularisation images", "weights": _pivot_cell}


def trained_with(preset: dict) -> str:
    """A digest of a cell's training preset with its paths replaced by what they stand for
    (:data:`MACHINE_PATHS`): the same on every machine and in every working folder."""
    portable = {key: (MACHINE_PATHS[key](value) if key in MACHINE_PATHS and value else value)
                for key, value in preset.items()}
    return hashlib.sha256(json.dumps(portable, sort_keys=True).encode()).hexdigest()[:12]


def archived_training(path: Path | None, measuring: dict, key: Callable[[dict], tuple]) -> dict[tuple, str]:
    """``key(cell) -> trained_with`` of the cells archived at ``path``, when the archive's cells were measured as
    ``measuring`` (:func:`measured_with` of the part about to run); empty without an archive, when it was
    measured otherwise, and for cells archived before fingerprints were."""
    archived_with, _, cells = read_archive(path) if path is not None else (None, None, [])
    if archived_with != measuring:
        return {}
    return {key(cell): cell["trained_with"] for cell in cells if "trained_with" in cell}


def left_to_train(planned: list[tuple[tuple, dict, dict]], archive: Path | None, key: Callable[[dict], tuple],
                  cached: Callable[[tuple, dict], bool], log: Callable[[str], None],
                  keep: Callable[[tuple], bool] = lambda cell: False) -> list[tuple[tuple, dict, dict]]:
    """The planned cells ``(cell id, preset, part settings)`` less those ``archive`` holds as measured and
    trained alike (:func:`archived_training`), except those ``cached`` in the working folder (reused there)
    and those to ``keep`` (H1's pivots: other parts train from their files); says how many were left out."""
    if archive is None or not planned:
        return planned
    archived = archived_training(archive, measured_with({"settings": planned[0][2]}), key)
    kept = [cell for cell in planned
            if keep(cell[0]) or cached(cell[0], cell[2]) or archived.get(cell[0]) != trained_with(cell[1])]
    if len(kept) < len(planned):
        log(f"{len(planned) - len(kept)} of {len(planned)} cells are in the cell archive {archive} (trained and "
            "measured alike): not trained again")
    return kept


def h1_cell_id(cell: dict) -> tuple[float, int, int]:
    """``(lr, seed, vectors)``: one H1 cell."""
    return float(cell["lr"]), int(cell["seed"]), int(cell["vectors"])


def h3_cell_id(cell: dict) -> tuple[str, float | None, float, int]:
    """``(variant, weight, lr, seed)``: one H3 cell (lr 0: the pivot alone)."""
    weight = None if cell["weight"] is None else float(cell["weight"])
    return cell["variant"], weight, float(cell["lr"]), int(cell["seed"])


def _order(key: tuple) -> tuple:
    return tuple(-1.0 if part is None else part for part in key)


def measured_with(cell: dict) -> dict:
    """How a cell was measured: its part's settings less the preset (model digest, init word, sampling
    seeds and steps, guidance), with its stages' training steps."""
    settings = cell.get("settings") or {}
    stages = (settings.get("preset") or {}).get("stages", [])
    return {k: v for k, v in settings.items() if k != "preset"} | {"steps": [stage.get("steps") for stage in stages]}


def read_archive(path: Path) -> tuple[dict | None, dict | None, list[dict]]:
    """The archive's ``measured_with``, null (None when not archived) and cells; none of them without the file."""
    if not Path(path).is_file():
        return None, None, []
    record = json.loads(Path(path).read_text())
    return record.get("measured_with"), record.get("null"), list(record.get("cells", []))


def updated_archive(path: Path, null: dict | None, measured: list[dict], key: Callable[[dict], tuple],
                    trained: Callable[[dict], bool] = lambda cell: True,
                    complete: Callable[[dict], bool] = lambda null: True) -> tuple[dict | None, list[dict], list[dict]]:
    """Merge the working folder's ``measured`` cells into the archive at ``path`` and write it back; returns
    (the null: ``null`` when it is ``complete``, else the archived one, else ``null``; every cell; the
    archived cells before the merge). ``trained``: the cells whose ``measured_with`` must match the
    archive's (H3: not the lr-0 pivots, which are H1's cells). Refused, naming ``path``, when they were
    measured otherwise."""
    archived_with, archived_null, archived = read_archive(path)
    ways = {json.dumps(measured_with(c), sort_keys=True) for c in measured if trained(c)}
    if len(ways) > 1:
        raise SystemExit(f"error: the working folder's cells were measured in {len(ways)} different ways "
                         f"({'; '.join(sorted(ways))}); report them into separate --results folders")
    now = json.loads(ways.pop()) if ways else archived_with
    if archived and archived_with is not None and now != archived_with:
        raise SystemExit(f"error: {path} archives cells measured with {archived_with}, the working folder's were "
                         f"measured with {now}: pass another --results (or move that archive away)")
    cells = merge_cells(archived, measured, key)
    null = null if null is not None and complete(null) else (archived_null or null)
    if cells:
        write_archive(path, now, null, cells)
    return null, cells, archived


def merge_cells(archived: list[dict], measured: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """Every cell of ``measured`` and those of ``archived`` that ``measured`` lacks (by ``key``), in order."""
    by_key = {key(c): c for c in archived} | {key(c): c for c in measured}
    return [by_key[k] for k in sorted(by_key, key=_order)]


def write_archive(path: Path, measured: dict | None, null: dict | None, cells: list[dict]) -> Path:
    """``path`` with ``measured`` (how the cells were measured), ``null`` and ``cells`` (less :data:`NOT_ARCHIVED`)."""
    kept = [_archived(c) for c in cells]
    null = None if null is None else {k: v for k, v in null.items() if k not in NOT_ARCHIVED}
    atomic_write_text(Path(path), json.dumps({"measured_with": measured, "null": null, "cells": kept}, separators=(",", ":"), default=_plain) + "\n")
    return Path(path)


def _archived(cell: dict) -> dict:
    """``cell`` less :data:`NOT_ARCHIVED`, with ``trained_with`` from its part's preset when it has one."""
    preset = (cell.get("settings") or {}).get("preset")
    fingerprint = {"trained_with": trained_with(preset)} if preset else {}
    return {k: v for k, v in cell.items() if k not in NOT_ARCHIVED} | fingerprint


def _plain(value):
    """A numpy scalar (a detected cell's index) as the Python number JSON writes."""
    return value.item()


def lora_cell_count(cells: list[dict]) -> int:
    """The trained H3 cells among ``cells`` (the lr-0 pivot cells are not runs)."""
    return sum(1 for c in cells if c["lr"] > 0)
