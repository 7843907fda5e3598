"""Running a sweep's training jobs: resume or skip each run, then train in this process or one process per GPU.

A run is *finished* when both its final files exist (the LoRA, then the embedding). A run folder that
another process is training (its run lock is held) is left alone. An interrupted run resumes from its
latest saved state (``--save_every``'s, or the one the trainer saves when interrupted), else its folder
is moved aside to ``<run>.incomplete-<k>`` and the run starts again. SIGINT, SIGTERM or SIGHUP stops the sweep
once the running runs saved their state (exit 128 + the signal; :mod:`.stopping`); the same command resumes it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from pti_plugin.config import ConfigError
from pti_plugin.run_lock import RunLocks
from pti_plugin.sweeps.plan import RunSpec
from pti_plugin.sweeps.stopping import StopRequests, kill_job, start_job, stop_signal_of, stop_sweep

#: The folder that holds the ``pti_plugin`` package this process imported; worker processes import the same one.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: How often (seconds) the sweep looks at its jobs: a signal is passed on, and a GPU that a job freed gets the next
#: one, this soon (a few ``poll`` calls a second cost nothing beside a training run).
POLL_S = 0.2


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment, with ``PYTHONPATH`` leading to the same ``pti_plugin`` package, plus ``extra``."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONPATH": path} | extra


#: A training process's program: the trainer's ``main`` inside :func:`~pti_plugin.outputs.script_continues_runs` (a
#: stopped run names its state; the sweep's last line says how to continue).
TRAIN_PROGRAM = ("import sys\nfrom pti_plugin.cli import main\nfrom pti_plugin.outputs import script_continues_runs\n"
                 "with script_continues_runs():\n    sys.exit(main(sys.argv[1:]))")


def train_command(argv: list[str]) -> list[str]:
    """The command line of a training process (the trainer's ``main`` with ``argv``)."""
    return [sys.executable, "-c", TRAIN_PROGRAM, *argv]


def latest_state(spec: RunSpec) -> Path | None:
    """The run's saved state of the highest step, interrupted ones included (the trainer's names)."""
    from pti_plugin.outputs import RunFiles  # imports torch

    states = [path for _, path in RunFiles(spec.run_dir, spec.output_name, spec.token).step_files() if path.is_dir()]
    return states[-1] if states else None


def held_by_another(spec: RunSpec) -> str | None:
    """Who trains the run now when another live process holds one of its run locks (the trainer's: its output_name's
    and its token's), else None."""
    names = {"output_name": spec.output_name, "token_string": spec.token}
    if not any((spec.run_dir / f"{name}.lock").is_file() for name in names.values()):
        return None
    locks = RunLocks(spec.run_dir, names)
    try:
        locks.acquire()
    except ConfigError as exc:
        return str(exc)
    locks.release()  # locks left by a killed run: nobody trains it (their files go with them)
    return None


def prepare_run(spec: RunSpec) -> list[str] | None:
    """The trainer's argv for an unfinished run (None when finished or being trained by another process); moves
    an unresumable partial run aside (a final LoRA without its embedding, or no saved state)."""
    if spec.finished:
        print(f"skip {spec.name}: finished ({spec.lora.name} and {spec.embedding.name} exist)", flush=True)
        return None
    if (owner := held_by_another(spec)) is not None:
        print(f"skip {spec.name}: another process is training it, left alone ({owner})", flush=True)
        return None
    argv = ["--preset", str(spec.preset_path)]
    if spec.run_dir.is_dir() and any(spec.run_dir.iterdir()):
        state = latest_state(spec)
        if state is not None and not spec.lora.is_file():
            print(f"resume {spec.name} from {state.name}", flush=True)
            return argv + ["--resume", str(state)]
        k = 1
        while spec.run_dir.with_name(f"{spec.run_dir.name}.incomplete-{k}").exists():
            k += 1
        aside = spec.run_dir.with_name(f"{spec.run_dir.name}.incomplete-{k}")
        spec.run_dir.rename(aside)
        print(f"restart {spec.name}: an interrupted run without a saved state was moved to {aside.name}", flush=True)
    print(f"train {spec.name}", flush=True)
    return argv


def train_in_process(spec: RunSpec, argv: list[str]) -> bool:
    from pti_plugin.cli import main as train_main
    from pti_plugin.outputs import script_continues_runs

    try:
        with script_continues_runs():  # a stopped run's message: its saved state, and the sweep's line (stop_sweep)
            code = train_main(argv)
    except Exception:  # each run starts from fresh accelerate state (Trainer._setup)
        traceback.print_exc()
        code = 1
    if (signum := stop_signal_of(code)) is not None:  # the trainer saved a state and stopped: so does the sweep
        stop_sweep(signum, [spec.name])
    if code != 0 or not spec.finished:
        print(f"FAILED {spec.name} (exit code {code})", flush=True)
        return False
    return True


def visible_gpus(choice: str) -> list[str]:
    if choice == "none":
        return []
    if choice != "auto":
        return [g.strip() for g in choice.split(",") if g.strip()]
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        count = 0
    return [str(i) for i in range(count)] if count > 1 else []


@contextlib.contextmanager
def _killed_on_error(running: dict):
    """Kill the jobs still in ``running`` (``{gpu: (name, process, log handle)}``) when the block fails: they run in
    their own session, so nothing else would stop them."""
    try:
        yield
    except BaseException:
        for _, process, handle in running.values():
            kill_job(process)  # with the processes it started (its own process group)
            process.wait()
            handle.close()
        raise


def run_on_gpus(jobs: list[tuple[str, list[str], Path]], gpus: list[str]) -> dict[str, int]:
    """Run ``(name, argv, log file)`` jobs as subprocesses, one per GPU at a time; returns exit codes. On SIGINT,
    SIGTERM or SIGHUP the running jobs are stopped as :mod:`.stopping` says and the sweep stops (SystemExit)."""
    pending, running, codes = list(jobs), {}, {}
    with StopRequests() as stops, _killed_on_error(running):
        while (pending and not stops.signals) or running:
            for gpu in gpus:
                if gpu not in running and pending and not stops.signals:
                    name, argv, log = pending.pop(0)
                    log.parent.mkdir(parents=True, exist_ok=True)
                    handle = open(log, "a", encoding="utf-8")
                    env = worker_env(CUDA_VISIBLE_DEVICES=gpu)
                    print(f"  GPU {gpu}: {name} (log {log})", flush=True)
                    process = start_job(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
                    running[gpu] = (name, process, handle)
            stops.pass_to([process for _, process, _ in running.values()])
            time.sleep(POLL_S)
            for gpu, (name, process, handle) in list(running.items()):
                if process.poll() is not None:
                    if stops.signals:  # stopped by the sweep: nothing of it is left behind
                        kill_job(process)
                    handle.close()
                    codes[name] = process.returncode
                    print(f"  GPU {gpu}: {name} finished with exit code {process.returncode}", flush=True)
                    del running[gpu]
    if stops.first is not None:
        stop_sweep(stops.first, [n for n, _, _ in jobs if stop_signal_of(codes.get(n))], [n for n, _, _ in pending])
    return codes


def train_runs(specs: list[RunSpec], engine, logs: Path) -> list[str]:
    """Train every unfinished run of ``specs`` (finished ones and those another process trains are skipped,
    interrupted ones resumed): in this process one after the other, each decided just before it trains, or one
    job per run on ``engine`` (an :class:`~pti_plugin.sweeps.engines.Engine`; decided before anything is
    dispatched; logs in ``logs/<run>.train.log``). Returns the names of the runs that failed."""
    if engine.in_process:
        return [spec.name for spec in specs
                if (argv := prepare_run(spec)) is not None and not train_in_process(spec, argv)]
    todo = [(s, a) for s in specs if (a := prepare_run(s)) is not None]
    codes = engine.run([(s.name, train_command(a), logs / f"{s.name}.train.log") for s, a in todo])
    failed = []
    for spec, _ in todo:
        if codes.get(spec.name) != 0 or not spec.finished:
            print(f"FAILED {spec.name} (exit code {codes.get(spec.name)}; see {logs / (spec.name + '.train.log')})", flush=True)
            failed.append(spec.name)
    return failed


def train_sweep(pivots: list[RunSpec], specs: list[RunSpec], engine, logs: Path) -> list[str]:
    """Train the shared pivot runs (one per training seed, if any) first, then the sweep's runs; returns the
    names of the sweep's runs that failed."""
    if pivots:
        train_runs(pivots, engine.single() if len(pivots) == 1 else engine, logs)
        missing = [str(p.embedding) for p in pivots if not p.embedding.is_file()]
        if missing:
            raise SystemExit(f"the shared pivot run failed: {', '.join(missing)} missing (see above)")
    return train_runs(specs, engine, logs)
