"""JSON caches keyed by the settings they were computed with: ``{"settings": {...}, <key>: ...}``.

Scores, evaluations and measured parts are cached beside a run under the settings that produced them;
a cache written under other settings, or unreadable (a crash mid-write on an old copy, a hand edit), is
treated as absent and recomputed, never trusted and never fatal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_cache(path: Path, settings: dict, key: str | None) -> Any:
    """``key`` of the cache at ``path`` (the whole dict when ``key`` is None) when it was written under
    ``settings``; None when the file is missing, unreadable or from other settings."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("settings") != settings:
        return None
    return data if key is None else data.get(key)
