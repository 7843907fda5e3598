"""The starting files read once: what the start-up check read from a file, kept for the one reader that needs it once
the model has loaded (``network_weights``'s LoRA, each ``base_weights`` file's merge).

The start-up check (:func:`pti_plugin.input_checks.check_starting_files`) keeps the tensors it read (:func:`keep`);
the reader takes them (:func:`take`) where the file is the one checked: same resolved path, size and modification
time. A file changed since its check, or one taken already (a second merge of the same file), is read again. A
process that only checks (a sweep planning its runs) drops them (:func:`release`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The tensors of the files the latest start-up check read, by file (:func:`_identity`), until their reader takes them.
_KEPT: dict[tuple[str, int, int], Any] = {}


def keep(files: dict[str, Any]) -> None:
    """Keep what the start-up check read (``files``: by path) for the readers, in place of an earlier check's."""
    _KEPT.clear()
    _KEPT.update({_identity(path): content for path, content in files.items()})


def take(path: str, read: Callable[[str], Any]) -> Any:
    """What the start-up check read from the file ``path``, taken, where the file has not changed since; else
    ``read(path)``."""
    return _checked_or_read(path, read, _KEPT.pop)


def peek(path: str, read: Callable[[str], Any]) -> Any:
    """What the start-up check read from the file ``path``, left for its reader (:func:`take`), where the file has not
    changed since; else ``read(path)``, not kept. The check itself reads the file once: ``dim_from_weights``'s dims."""
    return _checked_or_read(path, read, _KEPT.get)


def release() -> None:
    """Drop what the latest start-up check kept: a process that checks configs and trains none of them (a sweep
    planning its runs) holds no file's tensors."""
    _KEPT.clear()


def _checked_or_read(path: str, read: Callable[[str], Any], look: Callable[..., Any]) -> Any:
    """``look(identity, None)`` (``_KEPT``'s ``get`` or ``pop``) of the file ``path`` where it has not changed, else
    ``read(path)``."""
    kept = look(_identity(path), None) if Path(path).is_file() else None
    return kept if kept is not None else read(path)


def _identity(path: str) -> tuple[str, int, int]:
    """The file ``path`` as the start-up check read it: its resolved path, size and modification time."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns
