"""Help texts and hints said exactly: ``--overwrite``'s help and the ``overwrite`` key's documentation name what it
replaces (an earlier run of this output_name, never another run's embedding files); a refused rerun's "to continue
the earlier run" names the state of the run whose config is in the folder, not a state an overwritten run left at a
later step, and so does every other hint that suggests a state (a refused resume's, --resume of an output folder);
kohya's console options are refused with the console's real contents."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import toml

from pti_plugin.cli import list_keys, main
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import load_config
from pti_plugin.outputs import RunFiles
from pti_plugin.resume import read_progress


def test_overwrite_help_and_key_doc_say_it_replaces_this_output_names_run_never_another_runs_embedding(capsys):
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    block = shown[shown.index("\n  --overwrite "):shown.index("\n  --list_keys")]
    listed = list_keys()
    doc = listed[listed.index("\noverwrite = False\n"):].split("\n")[2]
    for text in (" ".join(block.split()), doc):
        assert "an earlier run of this output_name" in text, text
        assert "another run's embedding files (the same token_string, another output_name)" in text, text
        assert "refused with or without it" in text, text
        assert "files of the same names" not in text and "with the same names" not in text


def _state(folder, step: int, written_ns: int, name: str = "char"):
    state = folder / f"{name}-state-step{step:08d}"
    state.mkdir()
    (state / "progress.json").write_text(f'{{"stage_index": 0, "stage_step": {step}, "global_step": {step}}}')
    os.utime(state / "progress.json", ns=(written_ns, written_ns))
    return state


def _continue_hint(folder) -> str:
    with pytest.raises(ConfigError) as refused:
        RunFiles(folder, "char", "tok1").check_new_run(resuming=False)
    message = str(refused.value)
    assert "already holds" in message
    return message.split("; to continue the earlier run", 1)[1]


def _config(folder, written_ns: int) -> None:
    (folder / "char.config.toml").write_text(toml.dumps({"output_name": "char", "token_string": "tok1"}))
    os.utime(folder / "char.config.toml", ns=(written_ns, written_ns))
    (folder / "char.log.jsonl").write_text('{"global_step": 2, "stage": "inversion", "stage_step": 2}\n')


def test_continue_hint_names_the_state_of_the_run_whose_config_is_in_the_folder_not_an_overwritten_runs(tmp_path):
    """A first run saved states 1..3; a 2-step run with --overwrite wrote its config, then states 1 and 2, leaving the
    first run's state 3 (older than the config). Before: the hint resumed state 3, the replaced run's."""
    second = 2_000_000_000 * 10**9
    _state(tmp_path, 3, second - 10**9)  # the first run's, left in place
    _config(tmp_path, second)
    _state(tmp_path, 1, second + 10**9)
    kept = _state(tmp_path, 2, second + 2 * 10**9)
    hint = _continue_hint(tmp_path)
    note, command = hint.split(": ", 1)
    assert shlex.split(command)[-6:] == ["--preset", str(tmp_path / "char.config.toml"), "--resume", str(kept),
                                         "--output_dir", str(tmp_path)]
    assert "char-state-step00000003" in note and "older" in note and "--overwrite replaced" in note
    (tmp_path / "char-state-step00000003" / "progress.json").unlink()  # the replaced run's state moved away:
    (tmp_path / "char-state-step00000003").rmdir()  # one run's states alone, no note
    assert _continue_hint(tmp_path) == ": " + command


def test_continue_hint_when_every_state_is_older_than_the_config_says_it_may_be_a_replaced_runs(tmp_path):
    """The run that wrote the config (with --overwrite) saved no state: the first run's states are all that is
    there; the hint still names the latest, and says it may be a replaced run's (before: silently)."""
    now = 2_000_000_000 * 10**9
    _state(tmp_path, 1, now - 2 * 10**9)
    latest = _state(tmp_path, 2, now - 10**9)
    _config(tmp_path, now)
    note, command = _continue_hint(tmp_path).split(": ", 1)
    assert shlex.split(command)[-3] == str(latest)
    assert "older than char.config.toml" in note and "--overwrite replaced" in note


def _overwritten_run(folder) -> Path:
    """A first run saved states 1..4; a 2-step run with --overwrite wrote its config, then states 1 and 2 (returned),
    leaving the first run's states 3 and 4 (older than the config)."""
    second = 2_000_000_000 * 10**9
    _state(folder, 3, second - 2 * 10**9)
    _state(folder, 4, second - 10**9)
    _config(folder, second)
    _state(folder, 1, second + 10**9)
    return _state(folder, 2, second + 2 * 10**9)


def test_a_refused_resumes_continue_from_the_latest_state_hint_names_the_state_of_the_run_whose_config_is_there(
        tmp_path):
    """Resuming state 1 of the run whose config is in the folder is refused (its state 2 and the replaced run's 3 and 4
    are past step 1). Before: "or continue from the latest state instead" named state 4, the replaced run's; now state
    2, and the note names 3 and 4. Resuming state 2 itself: the later ones are the replaced run's, so no state is
    suggested (before: state 4)."""
    kept = _overwritten_run(tmp_path)
    with pytest.raises(ConfigError) as refused:
        RunFiles(tmp_path, "char", "tok1").check_new_run(resuming=True, resumed_step=1)
    note, command = str(refused.value).split("; or continue from the latest state instead", 1)[1].split(": --resume ")
    assert shlex.split(command) == [str(kept)]
    assert "char-state-step00000003, char-state-step00000004" in note and "--overwrite replaced" in note
    with pytest.raises(ConfigError) as refused:
        RunFiles(tmp_path, "char", "tok1").check_new_run(resuming=True, resumed_step=2)
    assert "char-state-step00000004" in str(refused.value) and "continue from" not in str(refused.value)


def test_a_run_folder_given_to_resume_hints_each_runs_state_by_its_config_not_the_highest_step_of_any(tmp_path):
    """--resume given the output folder: the hint names, for each run there, the state to continue (char: state 2,
    saved since char.config.toml, not the replaced run's state 4; other, with no config: its latest). Before: the
    highest step of any run, char's state 4."""
    kept = _overwritten_run(tmp_path)
    other = _state(tmp_path, 3, 2_000_000_000 * 10**9, name="other")
    with pytest.raises(ConfigError) as refused:
        read_progress(tmp_path)
    hint = str(refused.value).split("; it is a run's folder holding 5 state folder(s): to continue, ", 1)[1]
    first, second = hint.split(" or --resume ")
    assert first.startswith(f"--resume {shlex.quote(str(kept))} (run 'char', the latest state saved since "
                            "char.config.toml was written; ")
    assert "char-state-step00000003, char-state-step00000004" in first
    assert second == f"{shlex.quote(str(other))} (run 'other', the latest saved)"


@pytest.mark.parametrize("option", ["console_log_level", "console_log_file", "console_log_simple"])
def test_console_options_are_refused_with_what_the_console_shows(option):
    with pytest.raises(ConfigError) as refused:
        load_config(None, {option: "INFO"}, [])
    message = str(refused.value)
    assert option in message
    assert "the options it leaves out while the configuration is read" in message and "start-up block" in message
