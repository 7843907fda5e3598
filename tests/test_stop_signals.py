"""Stop signals where they meet the process at a bad moment: a run's handler that lands in the run's own write to
stdout, the ranks of a multi-process run that did not get the signal, and a sweep's third signal to jobs that have
children of their own or run as Ray tasks (Ray itself is not started: its few calls are played by threads)."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
import torch

from pti_plugin.stop_signals import StopSignals, TrainingInterrupted


def _fill(fd: int) -> None:
    """Write to the pipe ``fd`` until it is full (the next blocking write waits before writing a byte)."""
    os.set_blocking(fd, False)
    try:
        while True:
            os.write(fd, b"." * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)


def _sleeping(thread_id: int) -> bool:
    """Whether the thread (native id) waits in the kernel now (Linux; elsewhere: assumed)."""
    try:
        stat = Path(f"/proc/self/task/{thread_id}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "S"


def test_a_signal_that_lands_in_the_runs_own_print_is_still_recorded_and_said(monkeypatch):
    """The signal arrives while the main thread writes to a full stdout (a slow terminal, a pipe nobody reads yet):
    the handler runs inside that write, which holds stdout's lock, and the trainer's print there raised
    'reentrant call inside <_io.BufferedWriter>' out of the interrupted write, ending the run without its save. The
    stop must be recorded, the interrupted write must finish, and the handler's line must reach stdout."""
    from pti_plugin.trainer import Trainer

    read_end, write_end = os.pipe()
    _fill(write_end)
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(is_main_process=True))
    stops = StopSignals(lambda message: Trainer._info(trainer, message))  # the trainer's own say
    main, writing, drained = threading.main_thread(), threading.Event(), []

    def signal_then_read():
        writing.wait(10)
        deadline = time.monotonic() + 5
        while not _sleeping(main.native_id) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the main thread waits in write() on the full pipe, before writing a byte
        signal.pthread_kill(main.ident, signal.SIGINT)
        time.sleep(0.3)
        while chunk := os.read(read_end, 65536):
            drained.append(chunk)

    reader = threading.Thread(target=signal_then_read)
    previous = stops.install()
    try:
        reader.start()
        writing.set()
        stdout.write("step 1 of the run\n")
        stdout.flush()  # blocks on the full pipe: the signal lands in this write
    finally:
        StopSignals.restore(previous)
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        stdout.close()
        reader.join(10)
        os.close(read_end)
    assert stops.received == signal.SIGINT
    output = b"".join(drained).decode()
    assert output.count("SIGINT received: finishing the current step, then saving") == 1, output[-300:]
    assert output.endswith("step 1 of the run\n"), output[-300:]  # the interrupted write finished


def test_a_say_that_raises_leaves_the_stop_recorded_and_its_line_on_stdout(capfd):
    """Whatever the message's print raises (there: stdout mid-write), the handler records the stop, does not raise,
    and its line still reaches stdout's descriptor."""
    told = []

    def say(message):
        if not told:
            told.append(message)
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")
        told.append(message)

    stops = StopSignals(say)
    stops(signal.SIGTERM)
    assert stops.received == signal.SIGTERM
    assert "SIGTERM received: finishing the current step, then saving" in capfd.readouterr().out


def test_a_second_signal_taken_for_the_same_stop_says_how_to_stop_at_once(monkeypatch):
    """A user's quick double Ctrl-C (0.4 s apart) is taken for the same stop passed on by a launcher (within
    SAME_STOP_S): its line said so but not what stops the run at once, which a user pressing twice wanted. It must
    say: again, a second or more after the first; and a press that late must then stop at once."""
    from pti_plugin import stop_signals

    clock = iter([50.0, 50.4, 51.2])
    monkeypatch.setattr(stop_signals.time, "monotonic", lambda: next(clock))
    said = []
    stops = StopSignals(said.append)
    stops(signal.SIGINT)
    stops(signal.SIGINT)
    assert stops.received == signal.SIGINT and "the same stop" in said[-1]
    assert "to stop at once: again, 1 s or more after the first" in said[-1], said[-1]
    with pytest.raises(KeyboardInterrupt):
        stops(signal.SIGINT)  # 1.2 s after the first, as the line says


class _Ranks:
    """Two processes' accelerators, played by two threads: ``reduce`` sums what every rank sent, as an all-reduce."""

    def __init__(self, size: int = 2):
        self.size, self.sent, self.calls = size, {}, 0
        self.barrier = threading.Barrier(size, timeout=10)

    def accelerator(self, rank: int):
        ranks = self

        class Accelerator:
            num_processes, device, is_main_process = ranks.size, torch.device("cpu"), rank == 0

            @staticmethod
            def reduce(tensor, reduction):
                assert reduction == "sum"
                ranks.sent[rank] = tensor.clone()
                ranks.barrier.wait()
                total = sum(ranks.sent.values())
                ranks.calls += rank == 0
                ranks.barrier.wait()
                return total

        return Accelerator()


def _stop_every_rank(received: list[int | None]) -> list[int | None]:
    """Run the trainer's after-step stop check on each rank (rank r got ``received[r]``); the signal each rank's
    ``TrainingInterrupted`` names (and its message), None where a rank went on training."""
    from pti_plugin.trainer import Trainer

    ranks = _Ranks(len(received))

    def rank(index):
        stops = StopSignals(lambda message: None)
        if received[index] is not None:
            stops(received[index])
        trainer = types.SimpleNamespace(
            stops=stops, accelerator=ranks.accelerator(index), state=types.SimpleNamespace(global_step=7), optimizer=None,
            outputs=types.SimpleNamespace(save_on_stop=lambda optimizer: [Path("out/interrupted-step00000007")],
                                          resume_hint=lambda paths: f"resume with: {paths[0]}"))
        try:
            Trainer._stop_if_signalled(trainer)
        except TrainingInterrupted as exc:
            assert str(exc).startswith(f"interrupted by {signal.Signals(exc.signum).name} after step 7\n"), exc
            return exc.signum
        return None

    with concurrent.futures.ThreadPoolExecutor(len(received)) as pool:
        named = list(pool.map(rank, range(len(received))))
    assert ranks.calls == 1  # one collective a step, whatever the ranks got
    return named


def test_every_rank_of_a_multi_process_run_names_the_signal_that_was_sent():
    """Ctrl-C reaches one rank (the one a terminal or a launcher signalled): the others stopped with it but named
    SIGTERM, so their messages and exit codes (143 beside 130) disagreed with the signal sent. Each rank names its
    own signal where it got one, else the one sent."""
    assert _stop_every_rank([signal.SIGINT, None]) == [signal.SIGINT, signal.SIGINT]
    assert _stop_every_rank([None, signal.SIGINT]) == [signal.SIGINT, signal.SIGINT]
    assert _stop_every_rank([None, signal.SIGTERM, None]) == [signal.SIGTERM] * 3
    assert _stop_every_rank([signal.SIGINT, signal.SIGTERM]) == [signal.SIGINT, signal.SIGTERM]
    assert _stop_every_rank([None, None]) == [None, None]


#: A job that outlasts Ctrl-C and SIGTERM (hung, as one that a sweep's third signal is for) and has a child of its
#: own that does too (as a trainer's data loader worker stuck in a read); prints its pid and its child's.
STUBBORN_JOB = """import os, signal, subprocess, sys, time
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(os.getpid(), child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int, seconds: float = 0.0) -> bool:
    """Whether process ``pid`` has ended (or ends within ``seconds``); a zombie has."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _processes(pids) -> list[psutil.Process]:
    """The processes ``pids`` as started (psutil's kill leaves alone a later process that got the same pid)."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_the_third_signal_to_a_sweep_kills_each_job_with_the_processes_it_started():
    """A ``--gpus`` job runs in its own session; the sweep's third signal killed the job alone, and what the job had
    started (its data loader workers) was left running. It must kill them too."""
    from pti_plugin.sweeps.stopping import KILL_AT, pass_on, start_job

    process = start_job([sys.executable, "-c", STUBBORN_JOB], stdout=subprocess.PIPE, text=True,
                        start_new_session=True)  # as run_on_gpus starts its jobs
    job, child = map(int, process.stdout.readline().split())
    started = _processes([job, child])
    try:
        pass_on([process], [signal.SIGINT] * (KILL_AT - 1))
        time.sleep(0.3)
        assert process.poll() is None and not _gone(child)  # the first two signals: passed on, not a kill
        pass_on([process], [signal.SIGINT], already=KILL_AT - 1)
        assert process.wait(5) == -signal.SIGKILL
        assert _gone(child, seconds=3), "the job's child outlived the sweep's kill"
    finally:
        _kill(started)
        process.stdout.close()


def test_a_ray_sweeps_third_signal_leaves_no_job_to_outlive_rays_shutdown(tmp_path, monkeypatch, capsys):
    """At the third signal a Ray sweep stopped waiting for its tasks at once and shut Ray down: a task's worker ended
    before it had read that signal (it reads every 0.5 s) left its job running, holding its GPU. When the sweep
    turns to shutting Ray down, each task's job, and what the job started, must be dead. Ray's calls here are
    played by threads (a task) and lists (the board): no Ray is started."""
    from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future

    from pti_plugin.sweeps import engines, ray_task
    from pti_plugin.sweeps.stopping import KILL_AT, StopRequests

    posted: list[int] = []
    board = types.SimpleNamespace(add=types.SimpleNamespace(remote=posted.extend),
                                  read=types.SimpleNamespace(remote=lambda: list(posted)))
    ray = types.ModuleType("ray")
    ray.get = lambda ref: ref.result() if isinstance(ref, Future) else ref

    def wait(refs, num_returns, timeout):
        done, _ = concurrent.futures.wait(refs, timeout, FIRST_COMPLETED if num_returns == 1 else ALL_COMPLETED)
        done = list(done)[:num_returns]
        return done, [ref for ref in refs if ref not in done]

    ray.wait = wait
    monkeypatch.setitem(sys.modules, "ray", ray)  # what the task imports
    log = tmp_path / "logs" / "run1.train.log"
    pids: list[int] = []
    started: list[psutil.Process] = []

    def signal_three_times():
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            printed = log.read_text().split() if log.is_file() else []
            pids[:] = [int(pid) for pid in printed[:2]] if len(printed) >= 2 else []
        if len(pids) < 2:  # the job did not start: no signal, the task ends by itself
            return
        started.extend(_processes(pids))
        for _ in range(KILL_AT):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

    pool = concurrent.futures.ThreadPoolExecutor(1)
    sender = threading.Thread(target=signal_three_times)
    try:
        with StopRequests() as stops:
            task = pool.submit(ray_task.run_job, [sys.executable, "-c", STUBBORN_JOB], str(log), "", str(tmp_path),
                               board)
            sender.start()
            engines._wait_for_tasks(ray, {task: "run1"}, stops, board)
            job_gone = bool(pids) and _gone(pids[0])  # now the sweep shuts Ray down
        assert len(stops.signals) == KILL_AT and len(pids) == 2, (stops.signals, pids)
        assert job_gone, "the job was still running when the sweep turned to shutting Ray down"
        assert _gone(pids[1], seconds=3), "the job's child outlived the sweep's kill"
    finally:
        sender.join(10)
        _kill(started)
        pool.shutdown(wait=True)


LEADER_LEAVING_A_CHILD = """import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time\\nfor s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\\n"
                          "time.sleep(60)"])
signal.signal(signal.SIGINT, lambda s, f: os._exit(130))
print(os.getpid(), child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["ray task", "third signal"])
def test_a_job_that_ended_at_the_sweeps_signal_leaves_no_process_behind(how):
    """The job's own process stops at the sweep's first signal but a process it started does not (a data loader
    worker stuck in a read). The group was killed only while the job itself lived: a Ray task returned as soon as
    its job ended, and the third signal found the job gone and killed nothing."""
    from pti_plugin.sweeps.stopping import KILL_AT, pass_on, start_job, wait_passing_stops

    process = start_job([sys.executable, "-c", LEADER_LEAVING_A_CHILD], stdout=subprocess.PIPE, text=True)
    job, child = map(int, process.stdout.readline().split())
    started = _processes([job, child])
    try:
        if how == "ray task":
            assert wait_passing_stops(process, lambda: [signal.SIGINT], poll_s=0.05) == 130
        else:
            pass_on([process], [signal.SIGINT])
            assert process.wait(5) == 130 and not _gone(child, seconds=0.3)  # the job alone stopped
            pass_on([process], [signal.SIGINT] * (KILL_AT - 1), already=1)
        assert _gone(child, seconds=3), "the job's child outlived the sweep's stop"
    finally:
        _kill(started)
        process.stdout.close()
