"""The next run's clean-up puts back a state folder an ``overwrite`` save moved aside (``.<state>.old<hex>``) only
when it is complete: a process killed while removing it (after its new state took the name) leaves part of it, and
such a part must not come back as a state when the name is free."""

from __future__ import annotations

import os

from pti_plugin.run_lock import clean_leftover_temporaries


def test_a_part_of_a_moved_aside_state_is_removed_not_put_back(tmp_path):
    """A kill inside the removal of the old state (``shutil.rmtree`` takes its files one by one) left two of its four
    files; the new state was deleted since. Before, the part was renamed back as ``pti-state-step00000003``."""
    part = tmp_path / ".pti-state-step00000003.old0123abcd"
    part.mkdir()
    (part / "progress.json").write_text('{"stage_index": 0, "stage_step": 3, "global_step": 3}')
    (part / "trainable.safetensors").write_bytes(b"x")
    removed = clean_leftover_temporaries(tmp_path, "pti", "tok1")
    assert removed == [part]
    assert sorted(os.listdir(tmp_path)) == []


def test_a_complete_moved_aside_state_is_put_back(tmp_path):
    """The same folder with its four files (a kill between the save's two renames) comes back under its name."""
    old = tmp_path / ".pti-state-step00000003.old0123abcd"
    old.mkdir()
    for name in ("progress.json", "trainable.safetensors", "optimizer.pt", "lr_scheduler.pt"):
        (old / name).write_bytes(b"x")
    assert clean_leftover_temporaries(tmp_path, "pti", "tok1") == []
    assert sorted(os.listdir(tmp_path)) == ["pti-state-step00000003"]
    assert len(os.listdir(tmp_path / "pti-state-step00000003")) == 4

