"""Output folder safety as a kohya user meets it: two versions of a character (``char``, ``char_v2``) trained into one
folder share the pivot token, so the standalone embedding ``<token>.safetensors`` of the first must not be replaced
by the second (``overwrite`` replaces an earlier run of *this* output_name only); ``overwrite`` names the earlier
run's step saves it leaves beside the new outputs; and the commands printed for the user survive copy and paste
(paths quoted, the script named as it was started). The folders are laid out by hand as the runs leave them (the
embedding's ``modelspec.title`` is its run's output_name, its config ``<output_name>.config.toml``)."""

from __future__ import annotations

import hashlib
import logging
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import toml
import torch
from safetensors.torch import save_file

from pti_plugin.config import ConfigError
from pti_plugin.outputs import RunFiles
from pti_plugin.resume import _latest_state_hint
from pti_plugin.run_outputs import RunOutputs


def _saved(path: Path, title: str | None) -> None:
    save_file({"emb_params": torch.zeros(1, 4)}, str(path), metadata={"modelspec.title": title} if title else None)


def _run(folder: Path, name: str, token: str = "tok1", title: str | None = "", steps: tuple[int, ...] = ()) -> None:
    """What a finished run ``name`` of ``token`` leaves: its config, LoRA, embedding and step saves."""
    folder.mkdir(parents=True, exist_ok=True)
    title = name if title == "" else title
    (folder / f"{name}.config.toml").write_text(toml.dumps({"output_name": name, "token_string": token}))
    for suffix in ("", *(f"-step{s:08d}" for s in steps)):
        _saved(folder / f"{name}{suffix}.safetensors", title)
        _saved(folder / f"{token}{suffix}.safetensors", title)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("resuming", [False, True])
def test_another_runs_embedding_is_refused_naming_that_run_with_or_without_overwrite(tmp_path, overwrite, resuming):
    """``char_v2`` into the folder of ``char`` (same token): refused naming run 'char' and its files, suggesting another
    output_dir or token_string, not --overwrite. Before: --overwrite replaced char's tok1.safetensors (its
    standalone embedding no longer matched the pivot bundled in char.safetensors), and without it the refusal
    suggested --overwrite."""
    out = tmp_path / "out1"
    _run(out, "char", steps=(2,))
    before = _digests(out)
    with pytest.raises(ConfigError) as error:
        RunFiles(out, "char_v2", "tok1", overwrite).check_new_run(resuming=resuming, resumed_step=1 if resuming else None)
    message = str(error.value)
    assert "already holds tok1.safetensors, tok1-step00000002.safetensors: embedding files run 'char' saved" in message
    assert "choose another output_dir for this run (or another token_string)" in message
    assert "replaces only an earlier run of this output_name" in message and "delete or move them yourself" in message
    assert "or set overwrite = true" not in message
    assert _digests(out) == before


def test_the_run_of_a_token_file_is_read_from_its_title_then_from_the_configs(tmp_path):
    """With --overwrite: a file whose title names another run here is refused; one whose title is this run's is
    replaced as before; a file with a title naming no run (``metadata_title``) or none is another run's when only
    another run's config here has the token, this run's when its own config has it too; a file no run here claims
    (a user's own embedding of that name, no config) is left to the rules as before."""
    out = tmp_path / "out"
    _run(out, "char", title="Char, the hero")  # metadata_title set: the title names no run
    with pytest.raises(ConfigError, match="embedding files run 'char' saved"):
        RunFiles(out, "char_v2", "tok1", True).check_new_run(resuming=False)
    _run(out, "char_v2", title="Char, the hero")  # this run's own earlier run has the token too: its overwrite goes on
    RunFiles(out, "char_v2", "tok1", True).check_new_run(resuming=False)
    _saved(out / "tok1.safetensors", "char")  # written by run 'char' (its LoRA is here): refused again
    with pytest.raises(ConfigError, match="embedding files run 'char' saved"):
        RunFiles(out, "char_v2", "tok1", True).check_new_run(resuming=False)
    _saved(out / "tok1.safetensors", "char_v2")  # written by this output_name's earlier run: replaced as before
    RunFiles(out, "char_v2", "tok1", True).check_new_run(resuming=False)
    alone = tmp_path / "alone"
    alone.mkdir()
    _saved(alone / "tok1.safetensors", None)
    RunFiles(alone, "char", "tok1", True).check_new_run(resuming=False)
    with pytest.raises(ConfigError, match="or set overwrite = true"):  # as before: this run's name, no run claims it
        RunFiles(alone, "char", "tok1", False).check_new_run(resuming=False)


def _schedule_config(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**({"save_every_n_steps": 2, "save_every_n_epochs": None, "save_n_epoch_ratio": None,
                               "save_state": True, "save_state_on_train_end": False, "overwrite": True, "resume": None,
                               "output_name": "char", "stages": [SimpleNamespace(steps=4)]} | overrides))


def test_overwrite_names_the_earlier_runs_step_saves_it_will_not_write_again(tmp_path, caplog):
    """An earlier 6-step run of ``char`` saved every step (LoRA, embedding, state) and was interrupted at step 5; the
    new 4-step run saves every 2 steps with states: it writes step 2 again (not step 4: its last step is the final
    save, which writes the state of step 4), so steps 1, 3, 5 (the interrupted ones) and 4's LoRA and embedding stay,
    named in a warning. Nothing is deleted. Before: nothing was said."""
    out = tmp_path / "out"
    _run(out, "char", steps=(1, 2, 3, 4))
    _saved(out / "char-interrupted-step00000005.safetensors", "char")
    for tag in ("step00000001", "step00000002", "step00000003", "step00000004", "interrupted-step00000005"):
        (out / f"char-state-{tag}").mkdir()
    before = sorted(p.name for p in out.iterdir())
    files = RunFiles(out, "char", "tok1", True)
    fake = SimpleNamespace(config=_schedule_config(), files=files)
    with caplog.at_level(logging.WARNING):
        RunOutputs._warn_saves_left(fake, 3)
    expected = ["char-state-step00000001", "char-step00000001.safetensors", "tok1-step00000001.safetensors",
                "char-state-step00000003", "char-step00000003.safetensors", "tok1-step00000003.safetensors",
                "char-step00000004.safetensors", "tok1-step00000004.safetensors",
                "char-interrupted-step00000005.safetensors", "char-state-interrupted-step00000005"]
    assert f"will not write again: {', '.join(expected)}; they stay as they are" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == before
    caplog.clear()
    fake.config = _schedule_config(save_state=False)  # without states: every state folder stays
    with caplog.at_level(logging.WARNING):
        RunOutputs._warn_saves_left(fake, 3)
    assert "char-state-step00000002" in caplog.text and "char-step00000002.safetensors" not in caplog.text


@pytest.mark.parametrize("argv0, script", [
    ("/work/my code/train_pti.py", ["accelerate", "launch", "/work/my code/train_pti.py"]),
    ("../main/train_pti.py", ["accelerate", "launch", "../main/train_pti.py"]),
    ("/usr/local/bin/pti-train", ["accelerate", "launch", "--no_python", "pti-train"]),
    ("/usr/lib/python3/site-packages/pytest/__main__.py", ["accelerate", "launch", "train_pti.py"]),
])
def test_printed_commands_quote_paths_and_name_the_script_as_started(tmp_path, monkeypatch, argv0, script):
    """The resume command, the refused rerun's "to continue the earlier run" and a folder given to --resume: a path
    with a space stays one argument, and the script is the one started (``sys.argv[0]``; the console script
    ``pti-train``; ``train_pti.py`` inside another program). Before: paths unquoted, ``train_pti.py`` always, and the
    rerun's hint was arguments without a command."""
    monkeypatch.setattr("sys.argv", [argv0, "--preset", "x.toml"])
    monkeypatch.setattr("pti_plugin.outputs._PROGRAM", {"trainer": True})  # as cli.main() records it for the command
    out = tmp_path / "My LoRAs"
    out.mkdir()
    (out / "char.config.toml").write_text(toml.dumps({"output_name": "char", "token_string": "tok1"}))
    state = out / "char-state-step00000002"
    state.mkdir()
    (state / "progress.json").write_text("{}")
    files = RunFiles(out, "char", "tok1")
    paths = {"lora": out / "char-step00000002.safetensors", "embedding": out / "tok1-step00000002.safetensors",
             "state": state}
    line = RunOutputs.resume_hint(SimpleNamespace(files=files), paths).splitlines()[1]
    assert line.startswith("resume with: ")
    assert shlex.split(line.removeprefix("resume with: ")) == script + [
        "--preset", str(out / "char.config.toml"), "--resume", str(state)]
    with pytest.raises(ConfigError) as error:
        files.check_new_run(resuming=False)
    hint = str(error.value).split("; to continue the earlier run: ")[1]
    assert shlex.split(hint) == script + [
        "--preset", str(out / "char.config.toml"), "--resume", str(state), "--output_dir", str(out)]
    folder_hint = _latest_state_hint(out).split("to continue, ")[1].removesuffix(" (the latest saved)")
    assert shlex.split(folder_hint) == ["--resume", str(state)]
