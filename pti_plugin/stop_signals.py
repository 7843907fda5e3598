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
import signal
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
            self._say(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving "
                      "(again to stop at once)")
            return
        if now - self._at < SAME_STOP_S:  # the same stop, passed on by a launcher or a scheduler
            self._say(f"{signal.Signals(signum).name} received too, {now - self._at:.2f} s after "
                      f"{signal.Signals(self.received).name}: the same stop (a launcher passing it on); still saving")
            return
        raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def install(self) -> dict:
        """Handle :data:`STOP_SIGNALS` from now on (main thread only); the handlers this replaces, for :meth:`restore`."""
        self.installed = True
        return {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python


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
