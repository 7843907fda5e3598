"""Small command-line defects: a config loaded once under --debug_dataset; --set below a key that is not a table."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pti_plugin.cli import main as train_main

from .conftest import draw_character


def _preset(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return str(path)


def test_debug_dataset_says_each_configuration_warning_once(tiny_model, tmp_path, capsys, caplog):
    """train_pti.py --debug_dataset loaded the config, then the preview loaded it again: every warning came twice."""
    folder = tmp_path / "train" / "2_tok1"
    folder.mkdir(parents=True)
    for i in range(2):
        draw_character(folder / f"{i}.png", i)
        (folder / f"{i}.txt").write_text("tok1, red hair")
    preset = _preset(tmp_path, f'pretrained_model_name_or_path = "{tiny_model}"\ntrain_data_dir = "{tmp_path / "train"}"\n'
                               f'resolution = 32\noutput_dir = "{tmp_path / "out"}"\n')
    caplog.set_level(logging.WARNING)
    # huber_c with the default loss_type (l2) is a kohya option that warns: kohya ignores it too
    assert train_main(["--preset", preset, "--debug_dataset", "--huber_c", "0.2"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in warned if m.startswith("huber_c = 0.2: not used")] == [
        "huber_c = 0.2: not used with loss_type = 'l2' and huber_schedule = 'snr' (kohya ignores it too)"]
    assert len(warned) == len(set(warned)), warned  # no warning said twice
    assert "tok1, red hair" in capsys.readouterr().out  # the preview itself is shown


EXPECTED = "--set stages.0.steps.x: stages.0.steps is {holds}, not a table (it takes int | None)"


@pytest.mark.parametrize("preset_text, holds", [
    (None, "unset"),  # no preset: the built-in stages
    ('learning_rate = 1e-4\n', "unset"),  # a preset without [[stages]]
    ('[[stages]]\nkind = "ti"\n[[stages]]\nkind = "lora"\n', "unset"),  # stages that leave steps out
    ('[[stages]]\nkind = "ti"\nsteps = 10\n[[stages]]\nkind = "lora"\nsteps = 5\n', "10"),
])
def test_set_below_a_stage_key_that_is_not_a_table_names_the_set_path(tmp_path, capsys, preset_text, holds):
    """Without [[stages]] this said "preset: key 'stages.0.steps' expects int | None", naming neither the --set nor
    what was wrong; with stages it said the key is not a table. Both now give the same message."""
    argv = [] if preset_text is None else ["--preset", _preset(tmp_path, preset_text)]
    assert train_main(argv + ["--set", "stages.0.steps.x=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: " + EXPECTED.format(holds=holds)


def test_set_below_a_top_level_key_that_is_not_a_table_names_the_set_path(tmp_path, capsys):
    assert train_main(["--preset", _preset(tmp_path, 'learning_rate = 1e-4\n'), "--set", "seed.x=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --set seed.x: seed is unset, not a table (it takes int)"
    assert train_main(["--preset", _preset(tmp_path, 'seed = 3\n'), "--set", "seed.x.y=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --set seed.x.y: seed is 3, not a table (it takes int)"
