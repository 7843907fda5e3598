"""Stopping a sweep on SIGINT (Ctrl-C), SIGTERM (a job scheduler's stop) or SIGHUP (its terminal closed), whatever
runs its jobs.

In this process (one run after the other) the trainer's own handler saves the run's interrupted state and the sweep
stops after it. When the jobs run in other processes (one per GPU, or Ray tasks), :class:`StopRequests` records the
sweep's signals instead, and each one is passed on to every running job once: the first makes each trainer finish
its step, save its interrupted state and stop, as a run started by hand does; a second makes them stop at once
(their earlier saves kept). No job starts after the first; the sweep waits for the running ones, and a third
signal kills them, each with the processes it started (its process group), and stops waiting. The sweep then stops
with :func:`stop_sweep`'s message, exit status 128 + the first signal; the same command resumes it.

Job processes start in their own session (``start_new_session``): a terminal's Ctrl-C goes to its foreground
process group, and a job in that group would get it twice, from the terminal and from the sweep, and stop at once
without its save. A job gets SIGHUP as SIGTERM (a trainer saves on SIGTERM; SIGHUP would end it on the spot), and
a sweep started with SIGHUP ignored (``nohup``) keeps ignoring it. A Ray task cannot be signalled from the sweep:
it runs its job (in its own session too) under :func:`wait_passing_stops`, which reads the sweep's signals from a
Ray actor (:class:`StopBoard`) and passes them on; at the third the sweep waits for its tasks to kill their jobs
before it shuts Ray down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import NoReturn, TypeVar

from pti_plugin.stop_signals import SAME_STOP_S, STOP_SIGNALS, StopSignalled, StopSignals, stop_raises

_HANGUP = getattr(signal, "SIGHUP", None)  # POSIX only
#: The signals a sweep stops on, each with the one its jobs get.
PASSED_AS = {sig: sig for sig in STOP_SIGNALS}
if _HANGUP is not None:
    PASSED_AS[_HANGUP] = signal.SIGTERM
T = TypeVar("T")
#: The signal count at which the sweep stops waiting for its jobs and kills them.
KILL_AT = 3


def stop_signal_of(code: int | None) -> int | None:
    """The stop signal a job's exit code says ended it (128 + the signal: the trainer's; minus the signal: a process
    the signal killed), else None."""
    return next((int(sig) for sig in STOP_SIGNALS if code in (128 + sig, -sig)), None)


def stop_sweep(signum: int, interrupted: list[str], not_started: list[str] = ()) -> NoReturn:
    """Say how the sweep stopped and how to go on, as its last line; exit with 128 + ``signum``."""
    name = signal.Signals(signum).name
    parts = [f"{', '.join(interrupted)} interrupted (the state each saved, once it had trained a step, is named in its "
             "output)"]
    parts = parts if interrupted else []
    if not_started:
        parts.append(f"{len(not_started)} job(s) not started ({', '.join(not_started)})")
    _say(f"sweep stopped by {name}" + (f": {'; '.join(parts)}" if parts else "") + ". Run the same command again: it "
         "skips the finished runs, resumes the interrupted ones from their saved state and trains the rest")
    raise SystemExit(128 + signum)


def _say(text: str) -> None:
    """Print ``text``, if this process still has somewhere to print it (not after its terminal closed)."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def _stopping_signals() -> list[int]:
    """:data:`PASSED_AS`'s signals, less SIGHUP where it is ignored (``nohup``)."""
    return [sig for sig in PASSED_AS if sig != _HANGUP or signal.getsignal(sig) is not signal.SIG_IGN]


def stoppable(command: Callable[[], T]) -> T:
    """``command()``, a sweep's whole command. SIGINT, SIGTERM or SIGHUP outside a run's training (planning, between
    runs, scoring in this process), where no handler of a run or of :class:`StopRequests` is set, ends it with
    :func:`stop_sweep`'s last line (before: a Ctrl-C traceback; SIGTERM or SIGHUP ended it without a word)."""
    try:
        with stop_raises(_stopping_signals()):
            return command()
    except StopSignalled as exc:
        stop_sweep(exc.signum, [])
    except KeyboardInterrupt:  # a second Ctrl-C that a run's handler turned into one
        stop_sweep(signal.SIGINT, [])


class StopRequests:
    """While active (a ``with`` block in the main thread), the signals of :data:`PASSED_AS` are recorded in
    :attr:`signals` instead of stopping this process (SIGHUP only when not ignored); the previous handlers come back
    after. The handler prints nothing (a print there can meet the main thread's own): :meth:`news` does."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self._told = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in _stopping_signals()}
        return self

    def __exit__(self, *exc) -> None:
        StopSignals.restore(self._previous)

    def _record(self, signum, frame) -> None:
        self.signals.append(signum)

    @property
    def first(self) -> int | None:
        return self.signals[0] if self.signals else None

    def news(self, passing_on: Callable[[list[int], int], None]) -> None:
        """Hand the signals received since the last call to ``passing_on(signals, count before them)``, then announce
        each on this process's output."""
        already, new = self._told, self.signals[self._told:]
        self._told = already + len(new)  # not len(self.signals): one recorded meanwhile is told next time
        if not new:
            return
        passing_on(new, already)
        what = {1: "passing it on to the running jobs (each saves its state and stops); no job starts now; "
                   "again to stop them at once",
                2: "passing it on again: the jobs stop at once (their earlier saves are kept; a job that got the "
                   f"first under {SAME_STOP_S:g} s before takes this for the same stop and saves); again to kill them"}
        for count, signum in enumerate(new, start=already + 1):
            _say(f"\n{signal.Signals(signum).name} received: {what.get(count, 'killing the jobs left')}")

    def pass_to(self, processes: list[subprocess.Popen]) -> None:
        """Pass the signals received since the last call on to ``processes`` (:func:`pass_on`)."""
        self.news(lambda signals, already: pass_on(processes, signals, already))


def start_job(argv: list[str], **popen_args) -> subprocess.Popen:
    """``subprocess.Popen(argv, **popen_args)`` in its own session (its process group is the job: :func:`kill_job`),
    where SIGINT and SIGTERM can arrive: a child inherits its parent thread's blocked signals, and a Ray worker
    blocks SIGINT (its trainer then never heard the sweep's Ctrl-C)."""
    popen_args["start_new_session"] = True
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        return subprocess.Popen(argv, **popen_args)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(argv, **popen_args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL to the process group of ``process``, a job :func:`start_job` started: the job and every process it
    started (a trainer's data loader workers), none left holding a GPU, whether or not the job itself has ended
    (while any of them lives, the group's id is not reused); nothing where the group is gone."""
    if not hasattr(os, "killpg"):  # Windows: no process groups to signal
        if process.poll() is None:
            process.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def pass_on(processes: list[subprocess.Popen], signals: list[int], already: int = 0) -> None:
    """Send each of ``signals`` (the sweep's, after the ``already`` passed on) to every process still running, as
    :data:`PASSED_AS` says (to the process alone: a trainer's data loader workers end on SIGTERM); the
    :data:`KILL_AT`-th signal and later ones kill them and their process groups instead (:func:`kill_job`)."""
    for count, signum in enumerate(signals, start=already + 1):
        for process in processes:
            if count >= KILL_AT:
                kill_job(process)
            elif process.poll() is None:
                process.send_signal(PASSED_AS.get(signum, signum))


def wait_passing_stops(process: subprocess.Popen, read_signals: Callable[[], list[int]], poll_s: float = 0.5) -> int:
    """Wait for ``process``, passing on each signal ``read_signals`` (the sweep's, in order) adds; its exit code. A job
    that ends once a signal was passed on leaves nothing behind: what is left of its process group is killed."""
    passed = 0
    while process.poll() is None:
        signals = read_signals()
        pass_on([process], signals[passed:], passed)
        passed = max(passed, len(signals))
        try:
            process.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
    if passed:
        kill_job(process)
    return process.returncode


class StopBoard:
    """A Ray actor (``num_cpus=0``): the signals the sweep received, for its Ray tasks to pass on to their jobs."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def add(self, signals: list[int]) -> None:
        self.signals.extend(signals)

    def read(self) -> list[int]:
        return list(self.signals)


__all__ = ["KILL_AT", "PASSED_AS", "STOP_SIGNALS", "StopBoard", "StopRequests", "kill_job", "pass_on", "start_job",
           "stop_signal_of", "stop_sweep", "stoppable", "wait_passing_stops"]
