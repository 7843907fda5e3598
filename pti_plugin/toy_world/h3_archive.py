"""The committed record of every measured H3 cell, so that a report never loses finished cells.

The training runs and their parts live in the protocol's working folder (``outputs/protocol``), which is
not committed: a fresh clone, or a machine that lost that folder, has only the results folder. The
report therefore keeps ``h3_cell_records.json`` in the results folder: H1's null part and every H3 cell
(the pivot-alone lr-0 cells included) exactly as :func:`~.h3_summary.summarise_h3` reads them, i.e. the
per-image lists and the detected cells, without images or presets. Each rebuild summarises the union of
the archive and the working folder (the working folder wins for a cell in both) and writes it back.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic_io import atomic_write_text

ARCHIVE = "h3_cell_records.json"
#: What a part holds that the summary does not read (the preset, with this machine's paths; the time).
NOT_ARCHIVED = ("settings", "seconds")


def cell_id(cell: dict) -> tuple[str, float | None, float, int]:
    """``(variant, weight, lr, seed)``: one cell of the grid (lr 0: the pivot alone)."""
    weight = None if cell["weight"] is None else float(cell["weight"])
    return cell["variant"], weight, float(cell["lr"]), int(cell["seed"])


def _order(key: tuple) -> tuple:
    variant, weight, lr, seed = key
    return variant, -1.0 if weight is None else weight, lr, seed


def read_archive(results: Path) -> tuple[dict | None, list[dict]]:
    """The archived null part (None when not archived) and cells; none of either without an archive."""
    path = Path(results) / ARCHIVE
    if not path.is_file():
        return None, []
    record = json.loads(path.read_text())
    return record.get("null"), list(record.get("cells", []))


def merge_cells(archived: list[dict], measured: list[dict]) -> list[dict]:
    """Every cell of ``measured`` and those of ``archived`` that ``measured`` lacks, in grid order."""
    by_id = {cell_id(c): c for c in archived} | {cell_id(c): c for c in measured}
    return [by_id[key] for key in sorted(by_id, key=_order)]


def write_archive(results: Path, null: dict | None, cells: list[dict]) -> Path:
    """``results/h3_cell_records.json`` with ``null`` and ``cells`` (less :data:`NOT_ARCHIVED`)."""
    path = Path(results) / ARCHIVE
    kept = [{k: v for k, v in c.items() if k not in NOT_ARCHIVED} for c in cells]
    null = None if null is None else {k: v for k, v in null.items() if k not in NOT_ARCHIVED}
    atomic_write_text(path, json.dumps({"null": null, "cells": kept}, separators=(",", ":"), default=_plain) + "\n")
    return path


def _plain(value):
    """A numpy scalar (a detected cell's index) as the Python number JSON writes."""
    return value.item()


def lora_cell_count(cells: list[dict]) -> int:
    """The trained cells among ``cells`` (the lr-0 pivot cells are not runs)."""
    return sum(1 for c in cells if c["lr"] > 0)
