"""Resumable training state: a folder written atomically, read back before training continues.

``<state>/trainable.safetensors`` holds the pivot and LoRA weights by name, ``optimizer.pt`` and
``lr_scheduler.pt`` the optimizer and scheduler state of the current stage (loaded with
``weights_only=True``), ``progress.json`` the stage index and step counters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic_io import save_safetensors_atomic


@dataclass
class ResumedState:
    stage_index: int
    stage_step: int
    global_step: int
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]


def save_state(
    folder: Path, tensors: dict[str, torch.Tensor], optimizer: dict[str, Any], lr_scheduler: dict[str, Any],
    stage_index: int, stage_step: int, global_step: int,
) -> Path:
    """Write the state folder (to a temporary folder first, renamed when complete)."""
    if folder.exists():
        raise FileExistsError(f"refusing to overwrite state folder {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_safetensors_atomic(tmp / "trainable.safetensors", {k: v.detach() for k, v in tensors.items()})
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(lr_scheduler, tmp / "lr_scheduler.pt")
        progress = {"stage_index": stage_index, "stage_step": stage_step, "global_step": global_step}
        (tmp / "progress.json").write_text(json.dumps(progress))
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_state(folder: Path, tensors: dict[str, torch.nn.Parameter]) -> ResumedState:
    """Copy the saved trainable weights into ``tensors`` (by name) and return the rest of the state."""
    from safetensors.torch import load_file

    missing = [n for n in ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "progress.json") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a pti-plugin state folder: missing {', '.join(missing)}")
    saved = load_file(folder / "trainable.safetensors")
    if set(saved) != set(tensors):
        diff = sorted(set(saved) ^ set(tensors))
        raise ValueError(f"state {folder} does not match this run's trainable tensors (first difference: {diff[0]})")
    with torch.no_grad():
        for name, param in tensors.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    progress = json.loads((folder / "progress.json").read_text())
    return ResumedState(
        progress["stage_index"], progress["stage_step"], progress["global_step"],
        torch.load(folder / "optimizer.pt", weights_only=True), torch.load(folder / "lr_scheduler.pt", weights_only=True),
    )
