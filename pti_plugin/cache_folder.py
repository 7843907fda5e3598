"""The folder where pti-plugin keeps what it builds once (the embedded default's tiny model and toy-world dataset):
``$PTI_PLUGIN_CACHE``, else ``~/.cache/pti_plugin``. :func:`build_once` makes a name in it atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PTI_PLUGIN_CACHE", Path.home() / ".cache" / "pti_plugin")).expanduser()


def build_once(name: str, builder) -> Path:
    """``cache_dir()/name``, built by ``builder(tmp_dir)`` into a temporary folder then renamed."""
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        builder(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process built it first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
