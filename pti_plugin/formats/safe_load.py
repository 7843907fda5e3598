"""Loading downloaded model files without ever running code from them.

``.ckpt``/``.pt``/``.bin`` files are pickles, and a pickle can name any Python callable to run while
it loads. ``safe_torch_load`` uses PyTorch's ``weights_only`` unpickler (which only builds tensors and
plain containers) and allows, on top of it, exactly the few globals that legitimate Stable Diffusion
files reference, as AUTOMATIC1111's safe unpickler does:

- ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (and the module object
  ``pytorch_lightning.callbacks.model_checkpoint``): original SD checkpoints pickle the Lightning
  callback; a stand-in class takes its place, so Lightning is never imported;
- ``torch.nn.ParameterDict``: old A1111 ``.pt`` embeddings keep ``string_to_param`` in one (its
  ``Parameter`` is already in PyTorch's default set);
- numpy scalars, dtypes and arrays (``numpy.core.multiarray.scalar``/``_reconstruct``, also under
  numpy 2's ``numpy._core`` name): training step counters saved as numpy values.

Anything else is refused with ``UnsafeFileError`` before it can run. ``check_safetensors`` checks a
safetensors file's framing (header length, JSON header, tensor extents) with a clear error.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """A pickle-based file that asks for something outside the allow-list; it was not executed."""


class BadSafetensorsError(ValueError):
    """A safetensors file whose framing is broken (truncated, bad header); the message names the file."""


class ModelCheckpointStandIn:
    """Takes the place of Lightning's ``ModelCheckpoint`` in original SD checkpoints; holds its state only."""


class ModelCheckpointModuleStandIn:
    """Takes the place of the module object ``pytorch_lightning.callbacks.model_checkpoint``."""


def _numpy_globals() -> list[Any]:
    """numpy's scalar/array rebuild functions under both module names, ``ndarray``, ``dtype`` and its classes."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    # Unpickling a dtype builds an instance of its class (numpy.dtypes.Float64DType, ...).
    allowed += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUV"}, key=str)
    return allowed


def _allowed_globals() -> list[Any]:
    return [
        (ModelCheckpointStandIn, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (ModelCheckpointModuleStandIn, "pytorch_lightning.callbacks.model_checkpoint"),
        torch.nn.ParameterDict,
        *_numpy_globals(),
    ]


_GLOBAL_RE = re.compile(r"GLOBAL (\S+) was not an allowed global|unrecognized function (\S+)|but got (\S+)")
_DETAIL_RE = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.DOTALL)


def _refusal_reason(exc: Exception) -> str:
    """The one fact worth telling the user from torch's long ``weights_only`` error."""
    text = str(exc)
    match = _GLOBAL_RE.search(text)
    if match:
        what = next(g for g in match.groups() if g)
        return f"it asks to load or call {what}, which is not on the allow-list of what model and embedding files need"
    match = _DETAIL_RE.search(text)
    if match:
        return f"it holds pickle instructions the safe loader does not accept ({match.group(1)})"
    return text.splitlines()[0] if text else type(exc).__name__


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` plus the allow-list above.

    Raises ``UnsafeFileError`` (saying why, and suggesting conversion to safetensors) for a pickle
    that names anything else; nothing from the file runs. A truncated or corrupt file raises
    ``ValueError`` naming the file.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"refused to load {path}: {_refusal_reason(exc)}. Pickle-based files (.ckpt/.pt/.bin) can run "
            "code when loaded, so only tensors and a few known-safe types are accepted; nothing from the "
            "file was run. If you trust its source, convert it to .safetensors and use that instead."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, struct.error) as exc:
        raise ValueError(f"{path}: not a readable PyTorch file ({_refusal_reason(exc)})") from None


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Check a safetensors file's framing and return its parsed JSON header.

    Raises ``BadSafetensorsError`` naming the file for: a file shorter than the 8-byte length
    prefix, a header length beyond the end of the file, a header that is not a JSON object, and a
    tensor whose byte range is malformed or runs past the end of the file (a truncated download).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise BadSafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise BadSafetensorsError(
                f"{path}: safetensors header length {header_len} exceeds the file ({size} bytes): "
                "truncated or not a safetensors file"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSafetensorsError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BadSafetensorsError(f"{path}: safetensors header is not a JSON object")
    payload = size - 8 - header_len
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise BadSafetensorsError(f"{path}: tensor {key!r} has malformed data_offsets in the header")
        if offsets[1] > payload:
            raise BadSafetensorsError(
                f"{path}: tensor {key!r} ends at byte {offsets[1]} of the data but the file holds {payload}: truncated file"
            )
    return header
