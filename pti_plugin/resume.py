"""Resumable training state: a folder written atomically, read back before training continues.

``<state>/trainable.safetensors`` holds the pivot and LoRA weights by name, ``optimizer.pt`` and
``lr_scheduler.pt`` the optimizer and scheduler state of the current stage (loaded through the
project's allow-listed unpickler, ``formats/safe_load.py``), ``progress.json`` the stage index and
step counters. Loading refuses, naming the culprit, a broken file and a state that does not fit
the run (tensor names or shapes).
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

from .atomic_io import save_safetensors_atomic, umask


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
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's folder is private (0700); give it a plain mkdir's mode
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_STATE_FILES = ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "progress.json")


def read_progress(folder: Path) -> dict[str, int]:
    """Check that ``folder`` is a complete state folder and return its ``progress.json`` counters.

    Raises ``ConfigError`` naming the folder and what is missing or broken."""
    from .config import ConfigError

    if not folder.is_dir():
        raise ConfigError(f"key 'resume': {folder} is not a state folder")
    missing = [n for n in _STATE_FILES if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"key 'resume': {folder} is not a pti-plugin state folder: missing {', '.join(missing)}")
    try:
        progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"key 'resume': {folder / 'progress.json'} is not valid JSON ({exc})") from None
    keys = ("stage_index", "stage_step", "global_step")
    if not isinstance(progress, dict) or not all(type(progress.get(k)) is int and progress[k] >= 0 for k in keys):
        raise ConfigError(f"key 'resume': {folder / 'progress.json'} must hold the non-negative integers "
                          f"{', '.join(keys)}; got {progress!r}")
    return {k: progress[k] for k in keys}


def load_state(folder: Path, tensors: dict[str, torch.nn.Parameter], num_stages: int | None = None) -> ResumedState:
    """Copy the saved trainable weights into ``tensors`` (by name) and return the rest of the state.

    Every file goes through the safe loaders (``optimizer.pt``/``lr_scheduler.pt`` through the
    allow-listed unpickler); a state whose tensor names or shapes differ from this run's (another
    ``num_vectors_per_token``, ``network_dim``, LoRA targets) is refused naming the first difference.
    """
    from .config import ConfigError
    from .formats.safe_load import load_safetensors, safe_torch_load

    progress = read_progress(folder)
    if num_stages is not None and progress["stage_index"] >= num_stages:
        raise ConfigError(f"key 'resume': {folder} is at stage {progress['stage_index']}, "
                          f"but this run has {num_stages} stage(s)")
    try:
        saved = load_safetensors(folder / "trainable.safetensors")
        optimizer, scheduler = (safe_torch_load(folder / name) for name in ("optimizer.pt", "lr_scheduler.pt"))
    except ValueError as exc:
        raise ConfigError(f"key 'resume': {exc}") from None
    if set(saved) != set(tensors):
        diff = sorted(set(saved) ^ set(tensors))
        raise ConfigError(f"key 'resume': state {folder} does not match this run's trainable tensors "
                          f"(first difference: {diff[0]}, {'only in the state' if diff[0] in saved else 'only in this run'}); "
                          "resume with the settings the state was saved with")
    for name, param in tensors.items():
        if tuple(saved[name].shape) != tuple(param.shape):
            raise ConfigError(f"key 'resume': state {folder} holds {name} with shape {list(saved[name].shape)}, "
                              f"this run's is {list(param.shape)} (num_vectors_per_token, network_dim or "
                              "network_args differ from the saved run's)")
    if not isinstance(optimizer, dict) or not isinstance(scheduler, dict):
        raise ConfigError(f"key 'resume': {folder}: optimizer.pt and lr_scheduler.pt must hold state dicts")
    with torch.no_grad():
        for name, param in tensors.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    return ResumedState(progress["stage_index"], progress["stage_step"], progress["global_step"], optimizer, scheduler)
