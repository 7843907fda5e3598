#!/usr/bin/env python
"""The research bench: the user's protocol on the toy world, ground truth beside the model-internal metrics.

The command of :mod:`pti_plugin.sweeps.bench` (its docstring, or ``--help``, says everything):
``OMP_NUM_THREADS=1 python analysis/research_bench.py [--out outputs/research_bench]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

from pti_plugin.sweeps.bench import cli, main  # noqa: E402

__all__ = ["cli", "main"]  # main: what a caller running this file (runpy) calls for the bench's result

if __name__ == "__main__":
    cli()
