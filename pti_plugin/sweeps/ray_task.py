"""The Ray task that runs one job of a sweep (:mod:`.engines`' ``--engine ray``).

A Ray worker imports the module of the function it runs: this one imports no more than the task needs (the
sweep's :mod:`.engines` imports the planner, and with it torch, which cost every worker seconds of start-up
before its job started).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pti_plugin.sweeps.stopping import kill_job, start_job, wait_passing_stops


def run_job(command: list[str], log: str, pythonpath: str, cwd: str, board) -> int | None:
    """A Ray task: the job's command in a fresh process of this node's Python, in the sweep's working folder
    (relative paths of the command line mean the same as for the sweep); Ray has set CUDA_VISIBLE_DEVICES. The
    sweep's stop signals, read from ``board`` (a :class:`~pti_plugin.sweeps.stopping.StopBoard` actor), are passed
    on to the job; None when the sweep was stopping before the job started."""
    import ray

    def read_signals() -> list[int]:
        return ray.get(board.read.remote())

    if read_signals():
        return None
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p)}
    with open(log, "a", encoding="utf-8") as handle:
        process = start_job([sys.executable, *command[1:]], stdout=handle, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd if os.path.isdir(cwd) else None)
        try:
            return wait_passing_stops(process, read_signals)
        finally:
            if process.poll() is None:  # this task itself was stopped (its worker ends): the job goes with it
                kill_job(process)
                process.wait()


__all__ = ["run_job"]
