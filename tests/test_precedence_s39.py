"""Where a setting comes from: a kohya config_file's data source over the preset's, a top-level ``--set`` as typed,
a flag and a ``--set`` of one key in command-line order, and a dataset_config's values over the top-level dataset keys
(named, and recorded as trained). kohya: the dataset config wins over its folder options and over the command line's
dataset arguments; its argparse keeps the last of a flag given twice. Config-level only: no model loads."""

from __future__ import annotations

import logging

import pytest

from pti_plugin.command_line import parse_args
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import load_config
from pti_plugin.resolution import resolved_dict

STAGES = ('[[stages]]\nname = "inv"\nkind = "inversion"\nsteps = 2\nlearning_rate = 5e-3\n'
          '[[stages]]\nname = "lo"\nkind = "lora"\nsteps = 2\nlearning_rate = 1e-3\n')


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The current folder is ``tmp_path``, with image folders ``data`` and ``data2`` and a dataset_config ``d.toml``
    of them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    (tmp_path / "d.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data"\n')
    return tmp_path


def _load(argv):
    return load_config(*parse_args(argv), data_only=True)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("preset, kohya, source, replaced", [
    # the audit's case: light.toml / sd15_base set train_data_dir; the kohya file names a dataset_config
    ('train_data_dir = "data"\n', 'dataset_config = "d.toml"\n', ("dataset_config", "d.toml"),
     ("train_data_dir", "data")),
    ('dataset_config = "d.toml"\n', 'train_data_dir = "data2"\n', ("train_data_dir", "data2"),
     ("dataset_config", "d.toml")),
], ids=["file_dataset_config", "file_train_data_dir"])
def test_a_config_files_data_source_replaces_the_presets_other_one(in_tmp, caplog, preset, kohya, source, replaced):
    """It stopped with "preset: set only one of 'train_data_dir' and 'dataset_config'"."""
    (in_tmp / "p.toml").write_text(preset)
    (in_tmp / "k.toml").write_text(kohya)
    with caplog.at_level(logging.WARNING):
        config = _load(["--preset", "p.toml", "--config_file", "k.toml"])
    assert getattr(config, source[0]) == str(in_tmp / source[1]) and getattr(config, replaced[0]) == ""
    assert (f"config_file k.toml: {source[0]} replaces the preset's {replaced[0]} = '{in_tmp / replaced[1]}'"
            in _warnings(caplog))


def test_a_presets_own_config_file_replaces_the_data_source_of_the_preset_it_extends(in_tmp, caplog):
    (in_tmp / "base.toml").write_text('train_data_dir = "data"\n')
    (in_tmp / "k.toml").write_text('dataset_config = "d.toml"\n')
    (in_tmp / "p.toml").write_text('extends = "base.toml"\nconfig_file = "k.toml"\n')
    with caplog.at_level(logging.WARNING):
        config = _load(["--preset", "p.toml"])
    assert (config.dataset_config, config.train_data_dir) == (str(in_tmp / "d.toml"), "")
    assert (f"config_file {in_tmp / 'k.toml'}: dataset_config replaces the preset's train_data_dir = "
            f"'{in_tmp / 'data'}'") in _warnings(caplog)


def test_a_set_data_source_replaces_the_presets_other_one_and_an_error_names_where_each_came_from(in_tmp, caplog):
    (in_tmp / "p.toml").write_text('train_data_dir = "data"\n')
    with caplog.at_level(logging.WARNING):
        config = _load(["--preset", "p.toml", "--set", "dataset_config=d.toml"])
    assert (config.dataset_config, config.train_data_dir) == (str(in_tmp / "d.toml"), "")
    assert f"--set dataset_config replaces the preset's train_data_dir = '{in_tmp / 'data'}'" in _warnings(caplog)
    # a preset over its own config_file: both at one layer, refused naming each one's origin
    (in_tmp / "k.toml").write_text('dataset_config = "d.toml"\n')
    (in_tmp / "p2.toml").write_text('config_file = "k.toml"\ntrain_data_dir = "data"\n')
    with pytest.raises(ConfigError) as caught:
        _load(["--preset", "p2.toml"])
    assert str(caught.value).startswith(
        f"set only one of 'train_data_dir' and 'dataset_config', got train_data_dir = '{in_tmp / 'data'}' (preset), "
        f"dataset_config = '{in_tmp / 'd.toml'}' (config_file {in_tmp / 'k.toml'}).")


@pytest.mark.parametrize("item, refused", [
    ("max_train_steps=5", "max_train_steps = 5 (--set) is used by no stage: stages.0.steps = 2; stages.1.steps = 2. "
                          "To change a stage, use --set stages.0.steps=5 (inversion stage 'inv') or --set "
                          "stages.1.steps=5 (lora stage 'lo')."),
    ("learning_rate=1e-4", "learning_rate = 0.0001 (--set) is used by no stage: stages.0.learning_rate = 0.005; "
                           "stages.1.learning_rate = 0.001."),
], ids=["max_train_steps", "learning_rate"])
def test_a_top_level_set_that_no_stage_uses_is_refused_as_the_flag_is(in_tmp, item, refused):
    """``--set max_train_steps=5`` trained the stages' 2 steps without a word; ``--max_train_steps 5`` is refused."""
    (in_tmp / "p.toml").write_text('train_data_dir = "data"\n' + STAGES)
    with pytest.raises(ConfigError) as caught:
        _load(["--preset", "p.toml", "--set", item])
    assert str(caught.value).startswith(refused)


def test_a_top_level_set_learning_rate_is_typed_as_the_flag_is(in_tmp, caplog):
    """With the built-in stages it made the inversion learn at 1e-4 without the warning ``--learning_rate`` gives;
    beside stages whose groups each have their own rate it was accepted, reaching no group."""
    with caplog.at_level(logging.WARNING):
        config = _load(["--train_data_dir", "data", "--set", "learning_rate=1e-4"])
    assert [s.learning_rate for s in config.stages] == [1e-4, 1e-4]
    assert any(w.startswith("learning_rate = 0.0001 (--set) is also the rate of the inversion stage stages.0 "
                            "('inversion')") for w in _warnings(caplog)), _warnings(caplog)
    own_rates = STAGES.replace("learning_rate = 5e-3", "pivot_lr = 5e-3").replace("learning_rate = 1e-3", "unet_lr = 1e-3")
    (in_tmp / "g.toml").write_text('train_data_dir = "data"\n' + own_rates)
    with pytest.raises(ConfigError, match=r"^learning_rate = 0.0001 \(--set\) is used by no stage: stages.0's groups "
                                          r"take stages.0.pivot_lr = 0.005; stages.1's groups take stages.1.unet_lr"):
        _load(["--preset", "g.toml", "--set", "learning_rate=1e-4"])


@pytest.mark.parametrize("argv, dim, replaced", [
    (["--set", "network_dim=16", "--network_dim", "8"], 8, "--network_dim replaces the earlier --set network_dim=16"),
    (["--network_dim", "8", "--set", "network_dim=16"], 16, "--set network_dim=16 replaces the earlier --network_dim 8"),
], ids=["flag_last", "set_last"])
def test_a_flag_and_a_set_of_one_key_keep_the_later_one(in_tmp, caplog, argv, dim, replaced):
    """``--set`` won wherever it stood; kohya's argparse keeps the last of a flag given twice."""
    with caplog.at_level(logging.WARNING):
        config = _load(["--train_data_dir", "data", *argv])
    assert config.network_dim == dim
    assert [w for w in _warnings(caplog) if "network_dim" in w] == [
        replaced + " (the last one wins, as for a flag given twice)"]


def test_dataset_keys_every_dataset_or_subset_replaces_are_named_and_the_config_records_what_trains(in_tmp, caplog):
    """They were used silently from the dataset_config, and config.toml / modelspec.resolution kept the ignored
    command-line values (resolution 64 recorded, 32 trained)."""
    (in_tmp / "d.toml").write_text(
        '[general]\nshuffle_caption = true\nkeep_tokens = 2\ncaption_extension = ".caption"\n'
        '[[datasets]]\nresolution = 32\n'
        '  [[datasets.subsets]]\n  image_dir = "data"\n  keep_tokens = 4\n'
        '  [[datasets.subsets]]\n  image_dir = "data2"\n')
    argv = ["--dataset_config", "d.toml", "--keep_tokens", "1", "--shuffle_caption", "false", "--resolution", "64",
            "--flip_aug", "--train_batch_size", "3"]
    with caplog.at_level(logging.WARNING):
        config = _load(argv)
    path, tail = in_tmp / "d.toml", "(kohya: the dataset config wins over the command line and the preset)"
    assert sorted(w for w in _warnings(caplog) if w.startswith("dataset_config ")) == sorted([
        f"dataset_config resolution = 32 replaces resolution = 64 (command line) in every dataset: datasets.0 of {path} "
        f"sets it {tail}",
        f"dataset_config shuffle_caption = true replaces shuffle_caption = false (command line) in every subset: "
        f"[general] of {path} sets it {tail}",
        f"dataset_config keep_tokens = 4 / 2 replaces keep_tokens = 1 (command line) in every subset: "
        f"datasets.0.subsets.0 (4), [general] (2) of {path} set it {tail}",
    ])  # flip_aug and train_batch_size: no level of the file sets them, so the command line's values train
    # one value wins everywhere: recorded as trained (config.toml; modelspec.resolution reads config.resolution),
    # caption_extension too (not given: no warning); keep_tokens differs per subset: the command line's stays
    assert (config.resolution, config.shuffle_caption, config.caption_extension, config.keep_tokens,
            config.flip_aug, config.train_batch_size) == (32, True, ".caption", 1, True, 3)
    assert {k: resolved_dict(config)[k] for k in ("resolution", "shuffle_caption", "caption_extension")} == {
        "resolution": 32, "shuffle_caption": True, "caption_extension": ".caption"}


def test_set_items_leave_the_preset_dict_they_are_applied_to_as_it_was():
    """``--set stages.1.x=...`` wrote into the given dict's stage table (a shallow copy shares the [[stages]] list)."""
    from pti_plugin.config_loading import apply_overrides

    raw = {"stages": [{"kind": "inversion", "steps": 5}, {"kind": "lora", "steps": 7}], "plugins": {"p": {"w": [1]}}}
    out = apply_overrides(raw, {"seed": 3}, ["stages.1.steps=9", "plugins.p.w=[2]"])
    assert out["stages"][1]["steps"] == 9 and out["plugins"]["p"]["w"] == [2] and out["seed"] == 3
    assert raw == {"stages": [{"kind": "inversion", "steps": 5}, {"kind": "lora", "steps": 7}], "plugins": {"p": {"w": [1]}}}
