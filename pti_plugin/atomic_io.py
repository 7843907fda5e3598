"""Atomic, checked writes: a file appears under its final name complete or not at all.

Every writer here writes to a temporary file in the destination folder, flushes and fsyncs it,
then renames it over the final name (``os.replace``, atomic on POSIX and Windows). A failure
mid-write leaves any previous file intact and removes the temporary file; it raises :class:`WriteFailedError`
(:class:`DiskFullError` for lack of space) naming the final file and the cause. Tensors are checked
for non-finite values before anything is written. The final file gets the permissions a plain
``open()`` would give it (0666 less the umask), not ``mkstemp``'s private 0600.
Temporary names are ``.<final name>.<random>.tmp``; a process killed mid-write (SIGKILL) can leave
one, which the next run into the same output_dir removes (see ``run_lock.py``).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch


class WriteFailedError(OSError):
    """A file could not be written (a full disk, a quota, a file-size limit, a read-only or forbidden folder, an I/O
    error): the message names the file and the cause; whatever was under the file's name before is intact."""

    def __str__(self) -> str:  # the message alone (an OSError's str starts "[Errno N]")
        return str(self.strerror)


class DiskFullError(WriteFailedError):
    """Raised when a write fails for lack of space (a full disk or quota); the message says where and how much."""


#: The errnos of a write that failed for lack of space: a full disk, an exhausted quota.
NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def write_failed(final: Path, exc: OSError, size_hint: int | None = None) -> WriteFailedError:
    """The error to raise for ``exc``, met while writing ``final`` (``size_hint`` bytes, when known), naming the file
    and the cause. Before, a failure other than a full disk (a file-size limit: ``ulimit -f``, FAT32's 4 GiB; a quota;
    a folder made read-only) was the bare ``OSError`` of the temporary file's write, naming no file, with a traceback."""
    if isinstance(exc, WriteFailedError):
        return exc
    if exc.errno in NO_SPACE:
        need = f"{size_hint / 1e6:.1f} MB" if size_hint else "more space"
        try:
            free = f"{_free_bytes(final.parent) / 1e6:.1f} MB free"
        except OSError:
            free = "free space unknown"
        what = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return DiskFullError(exc.errno, f"{what} while writing {final}: needed {need}, {free} in {final.parent}")
    if exc.errno == errno.EFBIG:
        size = f" ({size_hint / 1e6:.1f} MB)" if size_hint else ""
        return WriteFailedError(exc.errno, f"could not write {final}{size}: file too large for this file system "
                                           "(FAT32 holds 4 GiB at most) or for this process's file-size limit (ulimit -f)")
    return WriteFailedError(exc.errno, f"could not write {final}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``. A write that fails
    raises :class:`WriteFailedError` (:class:`DiskFullError` for lack of space) naming ``path`` and the cause.

    ``size_hint`` (bytes) only improves the message.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise write_failed(final, exc, size_hint) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise write_failed(final, exc, size_hint) from exc
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    """Remove a temporary file; one that cannot be (a folder turned read-only) is left for the next run's clean-up."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], first: tuple[str, ...] | list[str] = ()) -> None:
    """Dict rows as CSV: the ``first`` columns that some row has, then every other key in order of
    appearance; ``None`` becomes an empty cell."""
    columns = [c for c in first if any(c in r for r in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None], size_hint: int | None = None) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically (for savers taking a path)."""
    with atomic_path(path, size_hint=size_hint) as tmp:
        writer(tmp)


def atomic_torch_save(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically. torch reports a failed write of its own (a full disk) as a
    ``RuntimeError`` whose context is the ``OSError``; that is raised as :func:`atomic_path`'s error, naming ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> Iterator[str]:
    """The names of the floating-point tensors of ``tensors`` holding a NaN or inf, in order, read lazily."""
    return (key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all())


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` holding a NaN or inf, else None."""
    return next(_non_finite(tensors), None)


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of every floating-point tensor of ``tensors`` holding a NaN or inf."""
    return list(_non_finite(tensors))


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the first tensor of ``tensors`` with a NaN or inf value."""
    key = first_non_finite(tensors)
    if key is not None:
        raise ValueError(f"refusing to write {what}: tensor {key!r} holds non-finite values")


def save_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Check ``tensors`` are finite, then write them as a safetensors file atomically."""
    from safetensors.torch import save

    check_finite(tensors, str(path))
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))
