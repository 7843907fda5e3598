"""The committed record of every measured H1 and H3 cell, so that a report never loses finished cells.

The training runs and their parts live in the protocol's working folder (``outputs/protocol``), which is
not committed: a fresh clone, or a machine that lost that folder, has only the results folder. The
report therefore keeps ``h1_cell_records.json`` and ``h3_cell_records.json`` there: the part's null
(H1's base model sampled twice) and every cell exactly as the summaries read them (H3: with the drift
split, the detected cells and the pivot-alone lr-0 cells), i.e. the per-image lists, without images or
presets. Each rebuild summarises the union of an archive and the working folder (the working folder
wins for a cell in both) and writes it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..atomic_io import atomic_write_text

H1_ARCHIVE = "h1_cell_records.json"
H3_ARCHIVE = "h3_cell_records.json"
#: What a part holds that the summaries do not read (the preset, with this machine's paths; the time).
NOT_ARCHIVED = ("settings", "seconds")


def h1_cell_id(cell: dict) -> tuple[float, int, int]:
    """``(lr, seed, vectors)``: one H1 cell."""
    return float(cell["lr"]), int(cell["seed"]), int(cell["vectors"])


def h3_cell_id(cell: dict) -> tuple[str, float | None, float, int]:
    """``(variant, weight, lr, seed)``: one H3 cell (lr 0: the pivot alone)."""
    weight = None if cell["weight"] is None else float(cell["weight"])
    return cell["variant"], weight, float(cell["lr"]), int(cell["seed"])


def _order(key: tuple) -> tuple:
    return tuple(-1.0 if part is None else part for part in key)


def read_archive(path: Path) -> tuple[dict | None, list[dict]]:
    """The archived null (None when not archived) and cells; none of either without the file."""
    if not Path(path).is_file():
        return None, []
    record = json.loads(Path(path).read_text())
    return record.get("null"), list(record.get("cells", []))


def merge_cells(archived: list[dict], measured: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """Every cell of ``measured`` and those of ``archived`` that ``measured`` lacks (by ``key``), in order."""
    by_key = {key(c): c for c in archived} | {key(c): c for c in measured}
    return [by_key[k] for k in sorted(by_key, key=_order)]


def write_archive(path: Path, null: dict | None, cells: list[dict]) -> Path:
    """``path`` with ``null`` and ``cells`` (less :data:`NOT_ARCHIVED`)."""
    kept = [{k: v for k, v in c.items() if k not in NOT_ARCHIVED} for c in cells]
    null = None if null is None else {k: v for k, v in null.items() if k not in NOT_ARCHIVED}
    atomic_write_text(Path(path), json.dumps({"null": null, "cells": kept}, separators=(",", ":"), default=_plain) + "\n")
    return Path(path)


def _plain(value):
    """A numpy scalar (a detected cell's index) as the Python number JSON writes."""
    return value.item()


def lora_cell_count(cells: list[dict]) -> int:
    """The trained H3 cells among ``cells`` (the lr-0 pivot cells are not runs)."""
    return sum(1 for c in cells if c["lr"] > 0)
