"""Several processes: a refusal only process 1 finds during the training steps, or before the process group starts, is
printed at once (before: process 1 waited QUIET_WAIT_S, 30 s, for a word from process 0, which waits in the steps'
collectives, or at the group's start, and never says one). Both processes are played in this one, in turn, as
tests/test_two_processes_r5.py does: RANK and the module's count of points passed set as each process has them."""

from __future__ import annotations

import time

from pti_plugin import cli, main_process_checks
from pti_plugin.main_process_checks import main_process_printed, tell_refusal_printed

from tests.test_two_processes_r5 import _store


def _as_process(monkeypatch, rank: int, points_passed: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(main_process_checks, "_points_passed", points_passed)


def _launched(monkeypatch):
    store = _store()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    return store


def test_a_refusal_process_1_alone_finds_in_the_training_steps_is_printed_at_once(monkeypatch, capsys):
    """Process 0 passed 4 points of the set-up, then began the training steps (where it stays, waiting for the others
    at each step). Process 1, refused at a step (an image only it draws became unreadable), hears "" at once and
    prints its own; in a set-up stretch, where process 0 printed a refusal, it still waits for that word."""
    store = _launched(monkeypatch)  # the launcher's store, held until the test's end
    monkeypatch.setattr(cli, "QUIET_WAIT_S", 20)
    monkeypatch.setattr(cli, "SAID_GRACE_S", 0)  # its wait for the launcher to stop it, once process 0 has printed
    _as_process(monkeypatch, 1, 3)  # process 1, refused in the set-up's 4th stretch: process 0 has said nothing yet
    started = time.monotonic()
    assert main_process_printed(0.5) is None
    assert time.monotonic() - started >= 0.4  # it waited for process 0's word
    _as_process(monkeypatch, 0, 3)
    tell_refusal_printed("error: model file unreadable")  # process 0 printed its refusal in that stretch
    _as_process(monkeypatch, 1, 3)
    assert main_process_printed(3) == "error: model file unreadable"

    _as_process(monkeypatch, 0, 4)  # another run's process 0: after its last set-up point, the steps begin
    main_process_checks.training_steps_begin()
    assert main_process_checks._points_passed == 4  # no point of the set-up: every process counts the same
    _as_process(monkeypatch, 1, 4)
    started = time.monotonic()
    assert main_process_printed(10) == ""
    assert cli._fail("error: 7.png: cannot identify image file", 2, alike=True) == 2
    assert capsys.readouterr().err == "error: 7.png: cannot identify image file\n"
    assert time.monotonic() - started < 2  # before: main_process_printed waited 10 s for None, _fail 20 s

    _as_process(monkeypatch, 0, 4)  # process 0 refused in the steps too: its word replaces the mark
    tell_refusal_printed("error: 7.png: cannot identify image file")
    _as_process(monkeypatch, 1, 4)
    assert cli._fail("error: 7.png: cannot identify image file", 2, alike=True) == 2
    assert capsys.readouterr().err == ""  # the same refusal, printed once (by process 0)
    del store


def test_a_refusal_process_1_alone_finds_before_the_process_group_starts_is_printed_at_once(monkeypatch):
    """Under torchrun's or accelerate launch's agent (its store is there before the group starts), process 0 passes
    a point before the group's start, which on CPUs waits for every process: process 1, refused before it (a resume
    folder only it could not read), hears "" at once. A group started by hand (its store hosted by process 0 from
    the group's start) has no such point; neither has a single-process run, which asks no store."""
    store = _launched(monkeypatch)  # the launcher's store, held until the test's end
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    _as_process(monkeypatch, 0, 0)
    main_process_checks.process_group_starts()
    assert main_process_checks._points_passed == 1
    _as_process(monkeypatch, 1, 0)
    started = time.monotonic()
    assert main_process_printed(10) == ""
    assert time.monotonic() - started < 2

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")  # a group started by hand: no point, nothing said
    _as_process(monkeypatch, 0, 2)
    main_process_checks.process_group_starts()
    assert main_process_checks._points_passed == 2
    _as_process(monkeypatch, 1, 2)
    assert main_process_printed(0.3) is None

    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no store is asked, nothing waits
    _as_process(monkeypatch, 0, 2)
    started = time.monotonic()
    main_process_checks.training_steps_begin()
    assert main_process_printed(10) is None
    assert time.monotonic() - started < 1
    del store
