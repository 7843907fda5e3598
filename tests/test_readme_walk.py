"""Commands the README documents run as written (found by walking the README as a new user)."""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pivot_locality_overhead_benchmark_runs_its_tiny_part(capsys):
    """README: "The cost, measured by `benchmarks/pivot_locality_overhead.py`"; its LoRA-only runs with the
    regulariser were refused (the pivot was its init word), so the benchmark stopped with a ConfigError."""
    _script("benchmarks/pivot_locality_overhead.py").main(["--skip-sd15", "--repeats", "1", "--tiny-steps", "1"])
    assert logging.root.manager.disable == logging.NOTSET  # the benchmark's silence ends with it (later tests log)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ratios = dict(re.findall(r"(\w+)=(\S+)", last))
    assert set(ratios) == {"tiny_ratio_batch", "tiny_ratio_noise", "tiny_ratio_cached", "sd15_ratio_batch"}
    for name in ("tiny_ratio_batch", "tiny_ratio_noise", "tiny_ratio_cached"):
        assert math.isfinite(float(ratios[name])) and float(ratios[name]) > 0, last
