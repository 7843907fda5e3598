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

``load_safetensors`` reads a checked file's tensors through ``safetensors`` (which memory-maps the file), or,
inside ``without_mmap()`` (kohya's ``disable_mmap_load_safetensors``, set while the base model and ``vae`` load),
by plain reads: each tensor's bytes are read into memory in file order, nothing is mapped (as kohya's own
non-mmap reader does; memory-mapped reads are very slow or fail on WSL's ``/mnt/c``, network drives and some
Windows set-ups). Both give the same tensors bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """A pickle-based file that asks for something outside the allow-list; it was not executed."""


class UnreadableFileError(ValueError):
    """A file that is not a readable PyTorch file (not a zip or pickle, truncated, corrupt); the message names it."""


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


_GLOBAL_RE = re.compile(
    r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+)|unrecognized function (\S+)|but got (\S+)"
)
_DETAIL_RE = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.DOTALL)
ALLOWED = ("tensors, plain containers (dict, list, tuple), numbers and strings, numpy scalars and arrays, "
           "and the Lightning checkpoint callback original SD checkpoints carry")


def _refusal_reason(exc: Exception) -> str:
    """The one fact worth telling the user from torch's long ``weights_only`` error (never its advice
    to load with ``weights_only=False``)."""
    text = str(exc)
    match = _GLOBAL_RE.search(text)
    if match:
        what = next(g for g in match.groups() if g).rstrip(".,")
        return f"it asks to load or call {what}, which is not on the allow-list of what model and embedding files need"
    match = _DETAIL_RE.search(text)
    if match and "weights_only" not in match.group(1):
        return f"it holds pickle instructions the safe loader does not accept ({match.group(1)})"
    return "it holds pickle content the safe loader does not accept"


def check_pytorch_framing(path: str | os.PathLike) -> bool:
    """Raise ``UnreadableFileError`` unless ``path`` starts like a ``torch.save`` file (a zip archive,
    or a protocol-2+ pickle for the legacy format); reads 4 bytes. Returns whether it is a zip archive."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        hint = " (it is a safetensors file: name it .safetensors)" if _looks_like_safetensors(path) else ""
        if path.name == "model_index.json":
            hint = " (it is the index of a diffusers model: pass the folder that holds it)"
        raise UnreadableFileError(f"{path}: not a PyTorch (.pt/.ckpt/.bin) file: it is neither a zip archive nor a pickle{hint}")
    return magic.startswith(b"PK\x03\x04")


def safe_torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` plus the allow-list above; ``mmap``: a zip-format
    file's tensors are mapped from the file, not read (a check of the pickle that holds no tensor in memory).

    Raises ``UnsafeFileError`` (saying what is allowed, and suggesting conversion to safetensors)
    for a pickle that names anything else; nothing from the file runs. A truncated, corrupt or
    non-PyTorch file raises ``UnreadableFileError`` naming the file.
    """
    path = Path(path)
    zipped = check_pytorch_framing(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes are not for our users
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"refused to load {path}: {_refusal_reason(exc)}. Pickle-based files (.ckpt/.pt/.bin) can run "
            f"code when loaded, so only {ALLOWED} are accepted; nothing from the file was run. "
            "To use it safely, convert it to .safetensors (where it came from, or on a machine you can "
            "afford to expose) and use that file instead."
        ) from None
    except OSError:
        raise
    except Exception as exc:  # torch's unpickler raises KeyError/IndexError/... on files that are not its own
        raise UnreadableFileError(f"{path}: not a readable PyTorch (.pt/.ckpt/.bin) or safetensors file "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _looks_like_safetensors(path: Path) -> bool:
    try:
        check_safetensors(path)
    except (BadSafetensorsError, OSError):
        return False
    return True


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Check a safetensors file's framing and return its parsed JSON header.

    Raises ``BadSafetensorsError`` naming the file for: a file shorter than the 8-byte length
    prefix, a header length beyond the end of the file, a header that is not a JSON object, a
    tensor whose byte range is malformed or runs past the end of the file (a truncated download),
    an unknown dtype, a byte range that does not match dtype x shape, and ranges that overlap or
    leave gaps. Every safetensors file the project opens (models, LoRAs, embeddings, resume states,
    ``inspect``) goes through this check before ``safetensors`` reads it.
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
    _check_extents(path, header, size - 8 - header_len)
    return header


_MMAP_DISABLED: ContextVar[bool] = ContextVar("pti_mmap_disabled", default=False)


@contextmanager
def without_mmap(disabled: bool = True) -> Iterator[None]:
    """Inside it (``disabled`` true), :func:`load_safetensors` reads files by plain reads instead of mapping them."""
    token = _MMAP_DISABLED.set(disabled)
    try:
        yield
    finally:
        _MMAP_DISABLED.reset(token)


def load_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``check_safetensors`` then the tensors (CPU; ``keys``: only those, else all): the one way to read a file's
    tensors. ``safetensors`` reads them from a memory map, or, inside :func:`without_mmap`, plain reads do."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    header = check_safetensors(path)
    wanted = [k for k in header if k != "__metadata__"] if keys is None else list(keys)
    if _MMAP_DISABLED.get():
        return _read_without_mmap(Path(path), header, wanted)
    try:
        if keys is None:
            return load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in wanted}
    except SafetensorError as exc:
        raise BadSafetensorsError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_without_mmap(path: Path, header: dict[str, Any], keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of the checked file ``path`` (its ``header``), each read into its own buffer in file order
    and viewed with its dtype and shape: the bytes safetensors would map, nothing mapped."""
    tensors = {}
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):
            entry = header[key]
            begin, end = entry["data_offsets"]
            dtype = TORCH_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise BadSafetensorsError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which this PyTorch lacks")
            data = bytearray(end - begin)
            handle.seek(8 + header_len + begin)
            if handle.readinto(data) != len(data):
                raise BadSafetensorsError(f"{path}: the file ended while tensor {key!r} was read: truncated file")
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            tensors[key] = flat.reshape(entry["shape"])
    return {k: tensors[k] for k in keys}  # in the order asked, whatever the order read


#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
#: The PyTorch dtype of each safetensors dtype (the unsigned and float8 ones where this PyTorch has them).
TORCH_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"),
    ("I16", "int16"), ("U16", "uint16"), ("F16", "float16"), ("BF16", "bfloat16"), ("I32", "int32"), ("U32", "uint32"),
    ("F32", "float32"), ("F64", "float64"), ("I64", "int64"), ("U64", "uint64")) if hasattr(torch, attr)}


def _check_extents(path: Path, header: dict[str, Any], payload: int) -> None:
    """Every tensor's byte range fits its dtype x shape, and the ranges tile the data exactly
    (no overlap, no gap, nothing past the end), as the safetensors format requires."""
    ranges = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise BadSafetensorsError(f"{path}: safetensors __metadata__ must map names to strings")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise BadSafetensorsError(f"{path}: tensor {key!r} has malformed data_offsets in the header")
        if offsets[1] > payload:
            raise BadSafetensorsError(
                f"{path}: tensor {key!r} ends at byte {offsets[1]} of the data but the file holds {payload}: truncated file"
            )
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if dtype not in DTYPE_BYTES:
            raise BadSafetensorsError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise BadSafetensorsError(f"{path}: tensor {key!r} has a malformed shape {shape!r}")
        expected = DTYPE_BYTES[dtype] * math.prod(shape)
        if offsets[1] - offsets[0] != expected:
            raise BadSafetensorsError(
                f"{path}: tensor {key!r} ({dtype} {shape}) needs {expected} bytes but its data_offsets "
                f"{offsets} span {offsets[1] - offsets[0]}"
            )
        ranges.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(ranges):
        if start != end:
            what = "overlaps the previous tensor" if start < end else f"leaves a gap of {start - end} bytes"
            raise BadSafetensorsError(f"{path}: tensor {key!r} (data_offsets [{start}, {stop}]) {what}")
        end = stop
    if end != payload:
        raise BadSafetensorsError(f"{path}: the tensors cover {end} bytes of data but the file holds {payload}")
