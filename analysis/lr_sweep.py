#!/usr/bin/env python
"""Learning-rate sweep of one stage at a fixed step budget, then a measurement of every run.

The command of :mod:`pti_plugin.sweeps.lr_sweep` (its docstring, or ``--help``, says everything):
``python analysis/lr_sweep.py --preset P --stage inversion|lora --lrs 1e-3,5e-3,1e-2 [--steps 1000]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

from pti_plugin.sweeps.lr_sweep import cli  # noqa: E402

if __name__ == "__main__":
    if code := cli():  # exit 0 by returning (scripts run in-process, runpy, are not stopped)
        sys.exit(code)
