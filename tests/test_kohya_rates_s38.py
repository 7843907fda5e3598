"""A kohya user's ``learning_rate`` and ``max_train_epochs`` on the built-in stages, and the messages around them.

kohya's ``train_network.py``: ``learning_rate`` is the network's (LoRA's) rate, and ``max_train_epochs`` overrides
``max_train_steps`` (it prints "override steps"). Here a top-level ``learning_rate`` is the default of every stage,
the inversion stage's too (the built-in inversion stage learns at 5e-3 without one): never silently. No model loads.
"""

from __future__ import annotations

import logging

import pytest

from pti_plugin.cli import list_keys
from pti_plugin.command_line import parse_args
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import load_config


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The current folder is ``tmp_path``, with a ``data`` image folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path


def _load(argv):
    return load_config(*parse_args(["--train_data_dir", "data", *argv]), data_only=True)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


INVERSION_STAGES = '[[stages]]\nname = "inv"\nkind = "inversion"\n[[stages]]\nname = "lo"\nkind = "lora"\nlearning_rate = 2e-4\n'


@pytest.mark.parametrize("argv, files, rates, named", [
    # kohya's command line: the rate reaches both built-in stages (the design rule), with a warning naming the stage
    (["--learning_rate", "1e-4"], {}, [1e-4, 1e-4], ("(command line)", "stages.0 ('inversion')")),
    # the kohya_ss GUI's file: learning_rate beside unet_lr
    (["--config_file", "k.toml"], {"k.toml": "learning_rate = 1e-4\nunet_lr = 1e-4\n"}, [1e-4, 1e-4],
     ("(config_file k.toml)", "stages.0 ('inversion')")),
    # a preset inversion stage without its own rate
    (["--preset", "p.toml", "--learning_rate", "1e-4"], {"p.toml": INVERSION_STAGES}, [1e-4, 2e-4],
     ("(command line)", "stages.0 ('inv')")),
])
def test_a_kohya_learning_rate_reaching_an_inversion_stage_is_named_once(in_tmp, caplog, argv, files, rates, named):
    """It slowed the inversion without a word (after 2 steps the pivot moved 0.39 degrees at 1e-4, 19.8 at 5e-3)."""
    for name, text in files.items():
        (in_tmp / name).write_text(text)
    with caplog.at_level(logging.WARNING):
        config = _load(argv)
    assert [s.learning_rate for s in config.stages] == rates
    warnings = [w for w in _warnings(caplog) if w.startswith("learning_rate = 0.0001")]
    assert len(warnings) == 1, _warnings(caplog)
    source, stage = named
    assert f"learning_rate = 0.0001 {source} is also the rate of the inversion stage {stage}" in warnings[0]
    assert "instead of the inversion default 0.005" in warnings[0] and "the LoRA's rate" in warnings[0]
    assert "add --set stages.0.learning_rate=0.005 " in warnings[0]


QUIET = [
    # the --set the warning names: the user chose the inversion's rate
    (["--learning_rate", "1e-4", "--set", "stages.0.learning_rate=5e-3"], {}, [5e-3, 1e-4]),
    (["--learning_rate", "1e-4", "--set", "stages.0.learning_rate=1e-4"], {}, [1e-4, 1e-4]),
    # kohya's LoRA-only rate: the inversion keeps its own
    (["--unet_lr", "1e-4"], {}, [5e-3, 1e-4]),
    # a rate equal to the inversion default changes nothing there
    (["--learning_rate", "5e-3"], {}, [5e-3, 5e-3]),
    # a preset's top-level rate is the preset's design
    (["--preset", "p.toml"], {"p.toml": "learning_rate = 1e-4\n"}, [1e-4, 1e-4]),
    # the preset inversion stage has its own pivot rate: the top-level one does not reach the pivot
    (["--preset", "p.toml", "--learning_rate", "1e-4"],
     {"p.toml": '[[stages]]\nkind = "inversion"\npivot_lr = 5e-3\n[[stages]]\nkind = "lora"\n'}, [1e-4, 1e-4]),
]


def test_no_warning_where_the_rate_does_not_replace_the_inversions_or_the_user_chose_it(in_tmp, caplog):
    with caplog.at_level(logging.WARNING):
        _load(["--learning_rate", "1e-4"])
    assert len(_warnings(caplog)) == 1  # the case the --set below answers
    for argv, files, rates in QUIET:
        caplog.clear()
        for name, text in files.items():
            (in_tmp / name).write_text(text)
        with caplog.at_level(logging.WARNING):
            config = _load(argv)
        assert [s.learning_rate for s in config.stages] == rates, argv
        assert _warnings(caplog) == [], argv


def test_list_keys_says_the_built_in_stages_rates():
    entry = list_keys().split("\nlearning_rate = 0.0001\n", 1)[1].split("\n", 1)[0]
    assert "0.005 (inversion)" in entry and "0.0001 (lora)" in entry and "inversion stage" in entry, entry


def test_the_used_by_no_stage_hint_names_each_stages_kind(in_tmp):
    (in_tmp / "p.toml").write_text('[[stages]]\nkind = "inversion"\nlearning_rate = 5e-3\n'
                                   '[[stages]]\nname = "lo"\nkind = "lora"\nlearning_rate = 1e-3\n')
    with pytest.raises(ConfigError) as caught:
        _load(["--preset", "p.toml", "--learning_rate", "1e-2"])
    assert str(caught.value).endswith("To change a stage, use --set stages.1.learning_rate=0.01 (lora stage 'lo') or "
                                      "--unet_lr 0.01 in place of learning_rate (kohya's LoRA rates; the inversion keeps "
                                      "its own) or --set stages.0.learning_rate=0.01 (inversion stage 'inversion0').")


@pytest.mark.parametrize("argv, file, source", [
    (["--max_train_epochs", "3", "--max_train_steps", "10"], "", ("command line", "command line")),
    (["--config_file", "k.toml"], "max_train_epochs = 3\nmax_train_steps = 10\n", ("config_file k.toml",) * 2),
    (["--config_file", "k.toml", "--max_train_epochs", "3"], "max_train_steps = 10\n", ("command line", "config_file k.toml")),
])
def test_max_train_epochs_overrides_max_train_steps_as_in_kohya_with_a_warning(in_tmp, caplog, argv, file, source):
    """The command line stopped with "used by no stage"; kohya trains the epochs, printing "override steps"."""
    (in_tmp / "k.toml").write_text(file)
    with caplog.at_level(logging.WARNING):
        config = _load(argv)
    assert [(s.steps, s.max_train_epochs) for s in config.stages] == [(None, 3), (None, 3)]
    assert [w for w in _warnings(caplog) if "max_train_steps" in w] == [
        f"max_train_epochs = 3 ({source[0]}) replaces max_train_steps = 10 ({source[1]}), as in kohya (\"override "
        "steps\"): stages.0 follows max_train_epochs = 3; stages.1 follows max_train_epochs = 3. To give a stage 10 "
        "steps instead, use --set stages.0.steps=10 (inversion stage 'inversion') or --set stages.1.steps=10 (lora "
        "stage 'lora')."]


def test_the_dataset_configs_batch_size_names_only_a_train_batch_size_the_user_gave(in_tmp, caplog):
    (in_tmp / "d.toml").write_text('[general]\nbatch_size = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data"\n')
    for argv, warned in (([], False), (["--train_batch_size", "1"], True), (["--train_batch_size", "2"], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            config = load_config(*parse_args(["--dataset_config", "d.toml", *argv]), data_only=True)
        assert config.train_batch_size == 2
        assert ("dataset_config batch_size = 2 replaces train_batch_size = 1" in caplog.text) is warned, (argv, caplog.text)
