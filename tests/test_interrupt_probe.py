"""Ctrl-C and a scheduler's SIGTERM where no test looked before: a sweep whose runs are other processes (one per
GPU, Ray tasks), a run signalled while it sets up, and one rank of a two-process run (the doubled signal a launcher
gives a training process is in tests/test_reliability.py). Each test starts the command in its own session, signals
it as a terminal (its process group) or a scheduler (one process) does, and kills whatever of it is left at the end."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import toml

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def _wait_for(condition, seconds: float = 240, poll_s: float = 0.1) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "the command did not get there in time"
        time.sleep(poll_s)


class Command:
    """A command in its own session; :meth:`close` kills it and every process it started that is still alive."""

    def __init__(self, argv: list[str], cwd: Path):
        self.process = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.seen: set[psutil.Process] = set()

    def descendants(self) -> list[psutil.Process]:
        """The command's processes now (remembered for :meth:`close` and :meth:`left`)."""
        try:
            now = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            now = []
        self.seen.update(now)
        return now

    def signal(self, signum: int, group: bool) -> None:
        self.descendants()
        os.killpg(self.process.pid, signum) if group else self.process.send_signal(signum)

    def finish(self, seconds: float = 120) -> tuple[int, str]:
        output, _ = self.process.communicate(timeout=seconds)
        return self.process.returncode, output

    def left(self, seconds: float = 2) -> list[str]:
        """The command's processes still alive ``seconds`` after it ended (looked at until then: none left, done)."""
        deadline = time.time() + seconds
        while True:
            alive = []
            for process in self.seen:
                try:
                    if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                        alive.append(" ".join(process.cmdline()[:6]))
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.time() >= deadline:
                return alive
            time.sleep(0.1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.descendants()
            self.process.kill()
        for process in self.seen:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.communicate()


@pytest.fixture
def command():
    started: list[Command] = []

    def start(argv: list[str], cwd: Path) -> Command:
        started.append(Command(argv, cwd))
        return started[-1]

    yield start
    for each in started:
        each.close()


@pytest.fixture
def sweep_argv(tiny_model, tiny_dataset, tmp_path) -> list[str]:
    preset = tmp_path / "p.toml"
    preset.write_text(toml.dumps({
        "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
        "output_dir": str(tmp_path / "unused"), "train_batch_size": 2, "seed": 3, "log_every_n_steps": 1,
        "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2}],
    }))
    return [sys.executable, str(REPO / "analysis" / "lr_sweep.py"), "--preset", str(preset), "--stage", "inversion",
            "--steps", "400", "--no_evaluate", "--out", str(tmp_path / "out")]


def _start_run(raw: dict, tmp_path: Path, command, launcher: tuple[str, ...] = ()) -> tuple[Command, Path]:
    """``train_pti.py`` on the preset ``raw`` into ``tmp_path/out`` (after ``python``: ``launcher``'s arguments)."""
    raw.pop("output_dir", None)
    (tmp_path / "p.toml").write_text(toml.dumps(raw))
    out = tmp_path / "out"
    argv = [sys.executable, *launcher, str(REPO / "train_pti.py"), "--preset", "p.toml", "--output_dir", str(out)]
    return command(argv, tmp_path), out


def _check_stopped_sweep(code: int, output: str, signum: int, runs: list[Path], left: list[str]) -> None:
    """Exit 128 + the signal, the sweep's message last, each run that started with its interrupted state and no
    lock, nothing left running."""
    assert code == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"sweep stopped by {signal.Signals(signum).name}: ") and "Run the same command again" in last
    for run in runs:
        assert list(run.glob("pti-state-interrupted-step*")), sorted(p.name for p in run.iterdir())
        assert not list(run.glob("*.lock")), run
    assert not left, left


def test_a_job_started_where_sigint_is_blocked_still_hears_it_and_the_third_signal_kills_it():
    """A Ray worker blocks SIGINT, and a child inherits the blocked signals: the sweep's Ctrl-C never reached the
    trainer of a Ray task. The sweep's SIGHUP (its terminal closed) reaches a job as SIGTERM, on which a trainer saves;
    a job that does not stop is killed at the third signal (no sweep waits forever)."""
    from pti_plugin.sweeps.stopping import KILL_AT, start_job, wait_passing_stops

    def job(on_sigint: str, on_sigterm: str = "signal.SIG_DFL") -> subprocess.Popen:
        code = (f"import signal, sys, time\nsignal.signal(signal.SIGINT, {on_sigint})\n"
                f"signal.signal(signal.SIGTERM, {on_sigterm})\n"
                "print('ready', flush=True)\ntime.sleep(60)\n")
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # as in a Ray worker
        try:
            process = start_job([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        assert process.stdout.readline() == "ready\n"
        return process

    stopping, stubborn = job("lambda s, f: sys.exit(130)"), job("signal.SIG_IGN")
    hung_up = job("signal.SIG_DFL", "lambda s, f: sys.exit(143)")
    try:
        assert wait_passing_stops(stopping, lambda: [signal.SIGINT], poll_s=0.05) == 130
        assert wait_passing_stops(hung_up, lambda: [signal.SIGHUP], poll_s=0.05) == 143  # passed on as SIGTERM
        asked = []
        assert wait_passing_stops(stubborn, lambda: asked.append(1) or [signal.SIGINT] * min(len(asked), KILL_AT),
                                  poll_s=0.05) == -signal.SIGKILL
    finally:
        for process in (stopping, stubborn, hung_up):
            process.kill()
            process.wait()


def test_ctrl_c_outside_a_runs_training_stops_the_sweep_with_its_last_line(monkeypatch, capsys):
    """While the sweep plans, moves between runs or evaluates in this process, Ctrl-C came out as a traceback."""
    from pti_plugin.sweeps import lr_sweep

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(lr_sweep, "sweep", interrupted)
    try:
        with pytest.raises(SystemExit) as stop:
            lr_sweep.cli([])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt came out of the sweep's command")
    assert stop.value.code == 130
    assert capsys.readouterr().out.startswith("sweep stopped by SIGINT. Run the same command again")


@pytest.mark.parametrize("signum, group, gpus", [(signal.SIGINT, True, "0,1"), (signal.SIGTERM, False, "0")],
                         ids=["ctrl-c", "sigterm"])
def test_a_sweep_over_gpus_stopped_saves_every_running_run_and_leaves_no_process(signum, group, gpus, sweep_argv,
                                                                                   tmp_path, command):
    """Ctrl-C to a sweep over --gpus 0,1 (processes on the CPU here) of 3 runs used to reach the runs and give the
    sweep a KeyboardInterrupt traceback; SIGTERM to the sweep alone ended it silently and left its runs training,
    orphaned. Now each running run saves its state and stops, the run after them never starts, and the sweep says so
    last. The sweep passes either signal on to each of its running jobs alike: SIGTERM's sweep is over --gpus 0,
    one job running and one waiting (a trainer process less to start)."""
    lrs = ("0.01", "0.02", "0.03")[:len(gpus.split(",")) + 1]
    sweep = command([*sweep_argv, "--lrs", ",".join(lrs), "--gpus", gpus], tmp_path)
    runs = [tmp_path / "out" / "runs" / f"inversion-lr{lr}" for lr in lrs]
    _wait_for(lambda: all(_lines(run / "pti.log.jsonl") >= 2 for run in runs[:-1]))
    sweep.signal(signum, group)
    code, output = sweep.finish()
    _check_stopped_sweep(code, output, signum, runs[:-1], sweep.left())
    assert not runs[-1].exists()
    assert f"1 job(s) not started (inversion-lr{lrs[-1]})" in output


def test_a_ray_sweep_stopped_by_ctrl_c_saves_its_running_run_and_shuts_ray_down(sweep_argv, tmp_path, command):
    """Ray workers block SIGINT and their jobs inherit that, and the sweep's KeyboardInterrupt shut Ray down at once:
    the running run was killed without a save (its lock files left), under a traceback. Now the sweep passes the
    signal on, waits for the save, shuts Ray down (no process of it left) and says how to go on. Every task reads
    the same signals (one run is enough). The Ray worker that runs the job has not loaded torch (it did, seconds of
    each task's start-up, by importing the sweep's engines)."""
    pytest.importorskip("ray", reason="the optional extra: pip install -e '.[cluster]'")
    sweep = command([*sweep_argv, "--lrs", "1e-2", "--engine", "ray"], tmp_path)
    run = tmp_path / "out" / "runs" / "inversion-lr0.01"
    _wait_for(lambda: _lines(run / "pti.log.jsonl") >= 2, 300)
    job = next(p for p in sweep.descendants() if "pti_plugin.cli import main" in _cmdline(p))
    assert not [m.path for m in job.parent().memory_maps() if "libtorch" in m.path], job.parent().cmdline()
    sweep.signal(signal.SIGINT, group=True)
    code, output = sweep.finish(180)
    _check_stopped_sweep(code, output, signal.SIGINT, [run], sweep.left())


def test_sigterm_while_a_run_sets_up_stops_it_naming_the_signal_and_releases_its_locks(preset, tmp_path, capsys,
                                                                                       monkeypatch):
    """Before the trainer's handler is set (model and data loading), SIGTERM used to end the process on the spot:
    exit -15, no word, the lock files left for the next run to take over. The signal arrives as the data is scanned,
    after the locks are taken."""
    import os

    from pti_plugin import trainer

    from .test_reliability import _cli

    scan = trainer.scan_images_and_held_out

    def signalled_scan(*args, **kwargs):
        assert (out / "pti.lock").exists()  # taken before the scan
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return scan(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(trainer, "scan_images_and_held_out", signalled_scan)
    code, output = _cli(preset(output_dir=str(out)), tmp_path, capsys)
    assert code == 128 + signal.SIGTERM, output[-2000:]
    assert output.strip().splitlines()[-1].startswith("stopped by SIGTERM while the run was setting up")
    assert "Traceback" not in output and not list(out.glob("*.lock"))


def test_a_signal_while_the_lock_is_written_releases_it(tmp_path, monkeypatch):
    """Stopped between taking the lock and recording its owner, the run kept the lock's file and its open descriptor:
    the file stayed, and in a process that goes on (a sweep, a notebook) the same run was refused as running."""
    from pti_plugin import run_lock

    def interrupted(fd):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(run_lock.os, "fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_lock.RunLock(tmp_path, "pti").acquire()
    assert not (tmp_path / "pti.lock").exists()
    with run_lock.RunLock(tmp_path, "pti"):
        pass


def test_one_rank_of_two_signalled_stops_both_with_one_saved_state_and_one_resume_command(preset, tmp_path, command):
    """A scheduler's SIGTERM to one process of a two-process run (torchrun, gloo): both ranks stop after the same
    step, rank 0 saves the state, the resume command is printed once and the run's locks are released."""
    raw = preset(max_train_steps=None, train_batch_size=1,
                 stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 400}])
    run, out = _start_run(raw, tmp_path, command, ("-m", "torch.distributed.run", "--nproc_per_node", "2"))
    _wait_for(lambda: _lines(out / "pti.log.jsonl") >= 2)
    rank1 = next(p for p in run.descendants() if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    code, output = run.finish()
    assert code != 0 and not run.left()
    assert output.count("resume with: ") == 1, output[-3000:]
    state = Path(re.search(r"--resume (\S+)", output).group(1))
    assert state.is_dir() and state.name.startswith("pti-state-interrupted-step")
    assert not list(out.glob("*.lock"))


def test_a_second_signal_within_a_second_is_the_same_stop_and_a_later_one_stops_at_once(monkeypatch):
    """The first signal is recorded; one 0.3 s later (a launcher passing the stop on) is said and ignored; one 1.5 s
    after the first (a user's second Ctrl-C) stops at once."""
    from pti_plugin import stop_signals

    clock = iter([100.0, 100.3, 101.5])
    monkeypatch.setattr(stop_signals.time, "monotonic", lambda: next(clock))
    said = []
    stops = stop_signals.StopSignals(said.append)
    stops(signal.SIGINT)
    assert stops.received == signal.SIGINT and "SIGINT received: finishing the current step" in said[-1]
    stops(signal.SIGTERM)
    assert stops.received == signal.SIGINT and "SIGTERM received too, 0.30 s after SIGINT: the same stop" in said[-1]
    with pytest.raises(KeyboardInterrupt):
        stops(signal.SIGINT)


def test_ctrl_c_between_the_research_benchs_sweeps_stops_it_with_the_sweeps_last_line(monkeypatch, capsys):
    """The bench scores runs and chooses its pivot between sweeps, in this process: a Ctrl-C there came out as a
    traceback."""
    from pti_plugin.sweeps import bench

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "main", interrupted)
    with pytest.raises(SystemExit) as stop:
        bench.cli([])
    assert stop.value.code == 130
    assert capsys.readouterr().out.startswith("sweep stopped by SIGINT. Run the same command again")


def test_two_signals_together_during_samples_stop_the_samples_once_and_reach_the_trainer():
    """accelerate's SIGTERM comes right after the terminal's Ctrl-C: both arrive during the samples. The samples stop
    once; the second signal, the same stop, is handed to the trainer and raises nothing (before: a second
    SamplesInterrupted came out of the handling of the first, and could end the run without its save)."""
    import threading

    from pti_plugin.sampling import sample_during_training
    from pti_plugin.stop_signals import StopSignals

    said = []
    stops = StopSignals(said.append)

    def sample(tag):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
        for sig in (signal.SIGINT, signal.SIGTERM):  # to this thread (a process signal could go to another thread)
            signal.pthread_kill(threading.get_ident(), sig)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # both handlers run now, one after the other
        for _ in range(100):
            time.sleep(0.001)
        return [Path("never")]

    before = signal.getsignal(signal.SIGINT)
    logging.disable(logging.CRITICAL)  # no handler's emit to swallow a second exception (logging's handleError would)
    try:
        assert sample_during_training(sample, "step1", stops) == []
        for _ in range(100):  # any signal still pending would be handled here
            time.sleep(0.001)
    finally:
        logging.disable(logging.NOTSET)
    assert stops.received == signal.SIGINT and any("same stop" in line for line in said), said
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_after_training_began_goes_to_the_runs_handler_not_the_setting_up_stop():
    """While a run sets up, a signal stops it at once; once its handler was installed (training began), a signal that
    meets the command's handler again, as the run's is taken down, is the run's (before: 'stopped while the run was
    setting up ... nothing saved', wrong after an interrupted save)."""
    import os

    from pti_plugin.stop_signals import StopSignalled, StopSignals, stop_raises

    stops = StopSignals(lambda line: None)
    with pytest.raises(StopSignalled):
        with stop_raises(after=stops):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    with stop_raises(after=stops):
        StopSignals.restore(stops.install())  # training began and ended: the command's handler is back
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert stops.received == signal.SIGTERM


def test_sigterm_outside_a_runs_training_stops_the_sweep_with_its_last_line(monkeypatch, capsys):
    """SIGTERM while the sweep plans or scores in this process: the sweep's last line and exit 143 (before: SIGTERM's
    default ended the process without a word)."""
    import os

    from pti_plugin.sweeps import lr_sweep

    def signalled(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)
        pytest.fail("SIGTERM did not stop the sweep")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(lr_sweep, "sweep", signalled)
    with pytest.raises(SystemExit) as stop:
        lr_sweep.cli([])
    assert stop.value.code == 143
    assert capsys.readouterr().out.startswith("sweep stopped by SIGTERM. Run the same command again")
    assert signal.getsignal(signal.SIGTERM) is before
