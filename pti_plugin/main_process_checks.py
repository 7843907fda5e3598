"""Start-up checks that only the main process makes (the output folder's claim), refused on every process.

Under several processes a check that only process 0 makes (it alone writes the output folder) must stop every
process when it refuses: the others would otherwise wait at the next collective for a process that has exited,
and end with the process group's ``Connection closed by peer`` traceback (or, on GPUs, a hang until the launcher
kills them). :func:`checked_on_main_process` runs the check on process 0 and raises its refusal on every process;
the other processes' copy is marked :data:`TOLD_BY_MAIN_PROCESS`, so the command line prints it once (process 0's).

A refusal every process finds on its own later in the set-up (the data, the model) is said once too: process 0
prints it and says so through the launcher's key-value store (:func:`tell_refusal_printed`); another process waits
for that word (:func:`main_process_printed`) and prints its own message only when process 0's differs or none comes.
None comes when process 0 found nothing wrong: it then waits for the others at the next operation that waits for every
process (a broadcast, a barrier, DDP's wrapping). Before each such point of the set-up, process 0 says that it found
no refusal since the previous one (:func:`passed_without_refusal`), so that a process refused alone prints at once. The
first such point is the process group's start (:func:`process_group_starts`); after the last, the training steps begin
(:func:`training_steps_begin`): from there a refusal is each process's own (an image only the process drawing it
reads), and process 0 marks that stretch at its start, as it never leaves it. Each stage's set-up begins with a point
(:func:`stage_set_up_begins`), which ends the previous stage's steps: a refusal every process finds in a later stage's
set-up is said once too.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable

#: attribute set on the copy of process 0's refusal that another process raises (the message is process 0's to print)
TOLD_BY_MAIN_PROCESS = "told_by_main_process"


def checked_on_main_process(accelerator, check: Callable[[], None]) -> None:
    """Run ``check`` on the main process only; an exception it raises is raised on every process (the same type and
    message; on the others marked :data:`TOLD_BY_MAIN_PROCESS`). Every process returns together, as a barrier."""
    error = None
    if accelerator.is_main_process:
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - passed on to every process, then raised here as it came
            error = exc
        else:
            passed_without_refusal()  # before the broadcast, which waits for every process
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [_sendable(error) if accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        if not accelerator.is_main_process:
            if box[0] is not None:
                setattr(box[0], TOLD_BY_MAIN_PROCESS, True)
                raise box[0]
            passed_without_refusal()  # the same point as process 0's
    if error is not None:
        raise error


def _sendable(error: Exception | None) -> Exception | None:
    """``error``, or a ``RuntimeError`` with its message when it cannot be pickled to the other processes."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(str(error))


def told_elsewhere(exc: BaseException) -> bool:
    """Whether ``exc``'s message is printed by another process: a copy of process 0's refusal
    (:func:`checked_on_main_process`)."""
    return bool(getattr(exc, TOLD_BY_MAIN_PROCESS, False))


def _launcher_store(timeout_s: float):
    """A client of the launcher's key-value store (``torchrun``'s and ``accelerate launch``'s, at ``MASTER_ADDR``:
    ``MASTER_PORT``), or None in a single-process run or when it cannot be reached."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or "MASTER_ADDR" not in os.environ:
        return None
    try:
        from datetime import timedelta

        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - no store to share the refusal through: each process says its own
        return None


#: how many points of the set-up this process has passed (:func:`passed_without_refusal`); every process passes the
#: same points in the same order, so a refusal's key names the stretch of the set-up where it was found
_points_passed = 0


def _refusal_key() -> str:
    # one per launch attempt and stretch of the set-up
    return f"pti_plugin/refusal/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_points_passed}"


def _tell(message: str) -> None:
    store = _launcher_store(5)
    if store is not None:
        try:
            store.set(_refusal_key(), message)
        except Exception:  # noqa: BLE001 - the others then say their own
            pass


def tell_refusal_printed(message: str) -> None:
    """Process 0 of a multi-process run, once it has printed ``message`` (a refusal): say so to the other processes
    (:func:`main_process_printed`). Nothing in a single-process run."""
    _tell(message)


def passed_without_refusal() -> None:
    """Every process, at a point of the set-up that every process passes in the same order, just before an operation
    that waits for every process: process 0 says that it found no refusal since the previous point (it would have
    stopped), so that another process refused since then prints its own at once (:func:`main_process_printed`)
    instead of waiting for process 0's, which would never come (process 0 now waits for it)."""
    global _points_passed
    if launcher_rank() == 0:
        _tell("")
    _points_passed += 1


def process_group_starts() -> None:
    """Every process, just before the process group starts (on CPUs gloo's start waits for every process): a point of
    the set-up (:func:`passed_without_refusal`), so that a refusal another process alone finds before it (a resume
    folder only it could not read) is printed at once. Only where the launcher's store is there before the group:
    ``torchrun``'s and ``accelerate launch``'s agent holds it; a group started by hand hosts it on process 0 from the
    group's start only, and process 0 would wait seconds here for it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the same on every process
        passed_without_refusal()


def training_steps_begin() -> None:
    """Every process, as a stage's training steps begin (after the last point of its set-up): from here a refusal is
    each process's own, not one every process finds. Process 0 marks this stretch as passed without a refusal ("") at
    its start, not at its end (it never leaves it: it waits in the steps' collectives), so that another process
    refused in the steps prints its own at once (:func:`main_process_printed`) instead of waiting for a word that
    never comes. A refusal process 0 prints later in the stretch replaces the mark (another process that reads it
    then says nothing when its own is the same). Nothing in a single-process run."""
    if launcher_rank() == 0:
        _tell("")


def stage_set_up_begins() -> None:
    """Every process, as a stage's set-up begins (before its plan: what it trains, its optimizer): a point of the set-up
    (:func:`passed_without_refusal`). After an earlier stage's training steps it ends their stretch, which process 0
    marked as passed at its start (:func:`training_steps_begin`): a refusal every process finds in this stage's set-up
    is then said once (another process waits for process 0's word instead of hearing the steps' mark and printing its
    own too), and one another process alone finds is said at once (process 0 passes the set-up's next point)."""
    passed_without_refusal()


def main_process_printed(timeout_s: float) -> str | None:
    """Another process of a multi-process run, refused at start-up: what process 0 printed as its refusal, waiting for
    it up to ``timeout_s`` seconds; "" when process 0 passed the same stretch of the set-up without a refusal
    (:func:`passed_without_refusal`); None when neither comes meanwhile or it cannot be asked."""
    from datetime import timedelta

    store = _launcher_store(timeout_s)
    if store is None:
        return None
    try:
        store.wait([_refusal_key()], timedelta(seconds=timeout_s))
        return store.get(_refusal_key()).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the wait timed out, or the launcher is gone
        return None


def launcher_rank() -> int:
    """This process's rank as the launcher (``torchrun``, ``accelerate launch``) set it; 0 without one."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
