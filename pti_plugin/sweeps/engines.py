"""Where a sweep's jobs run: this process, one process per local GPU, or Ray tasks (local or a cluster).

A *job* is ``(name, command line, log file)``: the same jobs (training runs, evaluations) go to
every engine, and which runs still need training is decided before any job is dispatched, so
skipping finished runs and resuming interrupted ones work the same whatever the engine.

Ray is an optional extra (``pip install -e ".[cluster]"``). With ``--engine ray`` each job is one
Ray task (1 CPU, and 1 GPU per task when the cluster has GPUs; ``--gpus_per_run`` overrides)
that runs the job's command in a fresh process on whichever node Ray picks; ``--address`` joins a
running cluster (``auto``, or ``ray://host:10001``), else a local Ray instance is started for
the sweep and stopped after it. On a cluster, the sweep's output folder and the preset's data
and model paths must be visible at the same paths on every node (a shared filesystem), and
``pti_plugin`` installed on each node.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from pti_plugin.sweeps.ray_task import run_job
from pti_plugin.sweeps.runner import PACKAGE_ROOT, run_on_gpus
from pti_plugin.sweeps.stopping import KILL_AT, StopBoard, StopRequests, stop_signal_of, stop_sweep
from pti_plugin.sweeps.usage import usage_exit

Job = tuple[str, list[str], Path]
#: At the sweep's KILL_AT-th signal, the longest it waits (seconds) for its Ray tasks to kill their jobs (each reads
#: the sweep's signals every 0.5 s) before Ray is shut down: a task's worker ended by the shutdown left its job running.
KILL_WAIT_S = 5.0


@dataclass
class Engine:
    kind: str = "local"  # "local" or "ray"
    gpus: list[str] = field(default_factory=list)  # local: one process per listed GPU; none = in this process
    address: str | None = None  # ray: a running cluster's address (None: start a local Ray)
    gpus_per_run: float | None = None  # ray: GPUs per task (None: 1 when the cluster has GPUs, else 0)

    @property
    def in_process(self) -> bool:
        """Whether jobs run here, one after the other (local engine without GPUs to spread over)."""
        return self.kind == "local" and not self.gpus

    def single(self) -> Engine:
        """The engine for one job on one device (the shared pivot run)."""
        return Engine(self.kind, self.gpus[:1], self.address, self.gpus_per_run)

    def describe(self) -> str:
        if self.kind == "ray":
            return f"Ray tasks ({self.address or 'local Ray'})"
        return f"GPUs {','.join(self.gpus)} (one process each)" if self.gpus else "sequential, in-process"

    def run(self, jobs: list[Job]) -> dict[str, int]:
        """Run the jobs (not in-process); returns each job's exit code by name."""
        if not jobs:
            return {}
        if self.kind == "ray":
            return run_on_ray(jobs, self.address, self.gpus_per_run)
        return run_on_gpus(jobs, self.gpus)


def ray_module():
    try:
        import ray
    except ImportError as exc:
        raise SystemExit('--engine ray needs Ray: pip install -e ".[cluster]" (or pip install ray)') from exc
    return ray


def _wait_for_tasks(ray, pending: dict, stops: StopRequests, board) -> dict[str, int | None]:
    """Exit codes by name of the Ray tasks ``pending`` (``{object ref: name}``), passing the sweep's stop signals on
    to them through ``board``; at :data:`~pti_plugin.sweeps.stopping.KILL_AT` signals it stops waiting once the
    tasks have killed their jobs (at most :data:`KILL_WAIT_S`; the tasks still running are then stopped with Ray)."""
    codes: dict[str, int | None] = {}
    while pending:
        stops.news(lambda signals, already: board.add.remote(signals))
        if len(stops.signals) >= KILL_AT:  # each task kills its job's process group on reading this signal: let them
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=KILL_WAIT_S)  # (a job can outlive
            for ref in done:  # Ray's shutdown); the codes of those that ended meanwhile are kept
                name = pending.pop(ref)
                codes[name] = _task_code(ray, ref, name)
            break
        done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        if done:
            name = pending.pop(done[0])
            codes[name] = _task_code(ray, done[0], name)
    return codes


def _task_code(ray, ref, name: str) -> int | None:
    """The exit code of the finished Ray task ``ref`` (running job ``name``): None when its job never started, 1 when
    the task itself failed; said, unless None."""
    try:
        code = ray.get(ref)
    except Exception as exc:  # the task itself failed (a node lost, ...)
        print(f"  ray: {name} failed: {exc}", flush=True)
        code = 1
    if code is not None:
        print(f"  ray: {name} finished with exit code {code}", flush=True)
    return code


def run_on_ray(jobs: list[Job], address: str | None, gpus_per_run: float | None) -> dict[str, int]:
    """Run every job as a Ray task and wait for all of them; returns exit codes by name. On SIGINT, SIGTERM or
    SIGHUP the running jobs are stopped as :mod:`.stopping` says, Ray is shut down and the sweep stops (SystemExit)."""
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        with StopRequests() as stops:  # after ray.init, which sets a SIGTERM handler of its own
            if gpus_per_run is None:
                gpus_per_run = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            task = ray.remote(num_cpus=1, num_gpus=gpus_per_run, max_retries=0)(run_job)
            board = ray.remote(num_cpus=0)(StopBoard).remote()
            cwd = os.getcwd()
            pending = {}
            for name, command, log in jobs if not stops.signals else []:  # stopping already: none starts
                pending[task.remote(command, str(log), str(PACKAGE_ROOT), cwd, board)] = name
                print(f"  ray: {name} (log {log})", flush=True)
            codes = _wait_for_tasks(ray, pending, stops, board)
    finally:
        if started:
            ray.shutdown()
    if stops.first is not None:  # a job left out of codes was still running at the signal that stops the waiting
        names = [name for name, _, _ in jobs if name in pending.values() or stop_signal_of(codes.get(name))
                 or codes.get(name) == -signal.SIGKILL]  # killed at that signal
        stop_sweep(stops.first, names, [name for name, _, _ in jobs if name not in names and codes.get(name) is None])
    return codes


def add_engine_arguments(parser, gpus_flag: bool = True) -> None:
    """``--engine``, ``--address``, ``--gpus_per_run``; ``gpus_flag``: the script has ``--gpus`` (local: one
    process per GPU)."""
    local = "in this process, or one process per GPU with --gpus" if gpus_flag else "in this process"
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help=f'local (default: {local}) or ray (each run a Ray task; pip install -e ".[cluster]")')
    parser.add_argument("--address", default=None, help="--engine ray: a running Ray cluster (auto, ray://host:10001); "
                                                        "default: a local Ray started for the sweep")
    parser.add_argument("--gpus_per_run", type=float, default=None,
                        help="--engine ray: GPUs per task (default: 1 when the cluster has GPUs, else 0)")


def engine_from_args(args, gpus: list[str]) -> Engine:
    if args.engine == "ray":
        ray_module()  # refuse now, before any training, when Ray is missing
        return Engine("ray", [], args.address, args.gpus_per_run)
    if args.address or args.gpus_per_run is not None:
        raise usage_exit("--address and --gpus_per_run apply to --engine ray only")
    return Engine("local", gpus)


__all__ = ["Engine", "Job", "add_engine_arguments", "engine_from_args", "run_on_ray"]
