"""The README documents every user-facing option: each key of ``Config`` is named there in backticks."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pti_plugin.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_names_every_top_level_key():
    named = {word for span in re.findall(r"`([^`\n]+)`", README) for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}
    missing = sorted(f.name for f in dataclasses.fields(Config) if f.name not in named)
    assert missing == [], f"Config keys the README never names: {missing}"
