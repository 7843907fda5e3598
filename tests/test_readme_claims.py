"""The README's lists of accepted values are the code's: optimizers, LR schedulers, samplers, stage keys."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from pti_plugin.config import StageConfig
from pti_plugin.lr_schedulers import SUPPORTED_SCHEDULERS
from pti_plugin.optimizers import SUPPORTED
from pti_plugin.sampling import SAMPLERS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def test_readme_lists_every_optimizer_scheduler_sampler_and_stage_key():
    paragraph = re.search(r"^Optimizers: (.*?)\n\n", README, re.S | re.M)
    assert paragraph, "README has no 'Optimizers:' paragraph"
    named = {name for name in _backticked(paragraph.group(1)) if " " not in name}  # not `pip install ...`
    accepted = set(SUPPORTED) | set(SUPPORTED_SCHEDULERS)
    assert accepted - named == set(), "accepted by the code, missing from the README's 'Optimizers:' paragraph"
    assert named - accepted == set(), "named in the README's 'Optimizers:' paragraph, refused by the code"

    samples_row = next((line for line in README.splitlines() if line.startswith("| `samples/` |")), "")
    assert samples_row, "README's outputs table has no samples/ row"
    missing = {name for name in SAMPLERS if not name.startswith("k_")} - _backticked(samples_row)
    assert missing == set(), "sample_sampler values missing from the README's samples/ row"

    table = re.search(r"^\| stage key \| meaning \|\n\| --- \| --- \|\n(.*?)\n\n", README, re.S | re.M)
    assert table, "README has no stage-key table"
    documented = set().union(*(_backticked(row.split("|")[1]) for row in table.group(1).splitlines()))
    keys = {f.name for f in fields(StageConfig)}
    assert keys - documented == set(), "[[stages]] keys missing from the README's stage-key table"
    assert documented - keys == set(), "README's stage-key table names keys [[stages]] does not have"
