"""How a training run hears SIGINT (Ctrl-C) and SIGTERM (a job scheduler's stop).

The first signal is recorded: the trainer finishes the current step, saves a resumable state and stops
(:class:`TrainingInterrupted`). A second one stops the run at once (``KeyboardInterrupt``; every write is atomic,
so no file is left half-written), unless it comes within :data:`SAME_STOP_S` of the first: then it is the same
stop passed on. ``accelerate launch`` answers the terminal's Ctrl-C, which the training process gets too, with a
SIGTERM to the training process (and a SIGKILL 5 s later); a scheduler may signal every process of a job beside
a launcher that passes the signal on. Taken for a second Ctrl-C, that SIGTERM used to stop the run without its save.

Where there is nothing to save yet (a run setting up, a sweep between its runs), :func:`stop_raises` makes a signal
stop the block at once with :class:`StopSignalled`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

#: A second SIGINT/SIGTERM this soon (seconds) after the first is the same stop passed on, not a second Ctrl-C.
SAME_STOP_S = 1.0
#: The signals a run saves its state and stops on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the current step finished and a resumable state was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def write_unbuffered(text: str) -> None:
    """Write ``text`` and a newline to standard output's file descriptor with one ``os.write``, past Python's buffered
    stream (a signal handler may run while that stream is mid-write); nothing if there is no such descriptor."""
    data = (text + "\n").encode(errors="replace")
    for stream in (sys.stdout, sys.__stdout__):
        try:
            os.write(stream.fileno(), data)
            return
        except (AttributeError, OSError, ValueError):  # no descriptor (a capture, closed), or it cannot be written
            continue


class StopSignals:
    """The run's signal handler (call it as one) and what it received: :attr:`received`, the first signal's number,
    or None. ``say`` prints a line to the user (the trainer's main-process output)."""

    def __init__(self, say: Callable[[str], None]):
        self.received: int | None = None
        self.installed = False  # whether training has begun (install): from then on a signal saves and stops
        self._at = 0.0
        self._say = say

    def __call__(self, signum: int, frame=None) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._at = signum, now
            self._tell(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving "
                       "(again to stop at once)")
            return
        if now - self._at < SAME_STOP_S:  # the same stop, passed on by a launcher or a scheduler
            self._tell(f"{signal.Signals(signum).name} received too, {now - self._at:.2f} s after "
                       f"{signal.Signals(self.received).name}: the same stop (a launcher passing it on); still saving "
                       f"(to stop at once: again, {SAME_STOP_S:g} s or more after the first)")
            return
        raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def _tell(self, text: str) -> None:
        """``say(text)``, which never raises here, in the handler: the signal may have interrupted this process's own
        write to the same stream (a print, tqdm's bar), whose lock it holds, and the handler's print then raises
        ``RuntimeError: reentrant call`` (out of the interrupted write: the run would end without its save). Then
        ``text`` goes straight to standard output's file descriptor, unbuffered, so it is still seen at once."""
        try:
            self._say(text)
        except Exception:
            write_unbuffered(text)

    def install(self) -> dict:
        """Handle :data:`STOP_SIGNALS` from now on (main thread only); the handlers this replaces, for :meth:`restore`."""
        self.installed = True
        return {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python


def received_on_any_process(received: int | None, accelerator) -> int | None:
    """The stop signal a run of several processes stops on, in every process (one collective, each calls it after
    the same step): its own ``received`` where it got one, else the one most of the others got (ties: the first of
    :data:`STOP_SIGNALS`); None where none got one. Each process sends a count per signal, summed over processes, so
    the processes that got no signal name the one that was sent (they named SIGTERM, whatever it was)."""
    import torch  # here: the sweeps import this module and not torch

    slot = {sig: index for index, sig in enumerate(STOP_SIGNALS)}
    counts = torch.zeros(len(STOP_SIGNALS), device=accelerator.device)
    if received is not None:
        counts[slot.get(received, len(STOP_SIGNALS) - 1)] = 1.0
    counts = accelerator.reduce(counts, reduction="sum").tolist()
    if received is not None or max(counts) <= 0:
        return received
    return int(STOP_SIGNALS[counts.index(max(counts))])


class StopSignalled(KeyboardInterrupt):
    """A stop signal arrived where there is nothing to save (a run setting up, a sweep between its runs)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_raises(signals=STOP_SIGNALS, after: StopSignals | None = None) -> Iterator[None]:
    """While the block runs (main thread only), each of ``signals`` raises :class:`StopSignalled`: there is nothing
    to save there, so the block stops at once and its ``finally`` clauses release what it holds (SIGTERM's default
    ends a process on the spot, leaving its lock files). Once ``after``, a run's own handler, has been installed, a
    signal that meets this one (as the run's handler is taken down) goes to it instead. The previous handlers come
    back after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if after is not None and after.installed:
            return after(signum, frame)
        raise StopSignalled(signum)

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        StopSignals.restore(previous)
