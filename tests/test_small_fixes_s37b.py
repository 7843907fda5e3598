"""Small leftovers: the last "not found" messages in the one form (``<what> not found: looked for <absolute path>``,
with the Windows-path hint); the dataset preview's ``--dataset_config`` replaces the preset's image folder as training
does (its own copy of the rule is gone). Each network_weights tensor read once: tests/test_trainer_options.py."""

from __future__ import annotations

import logging

import pytest

from pti_plugin.config import ConfigError

from .conftest import draw_character


# ----------------------------------------------------------------------------- "not found", the one form

def test_a_missing_base_weights_file_is_named_in_the_one_form(tmp_path):
    """It said "<path> not found (a kohya LoRA .safetensors file)"."""
    from pti_plugin.base_weights import require_file

    missing = tmp_path / "gone" / "style.safetensors"
    with pytest.raises(ConfigError) as error:
        require_file(str(missing))
    assert str(error.value) == (f"preset: key 'base_weights': file not found: looked for {missing} "
                                "(a kohya LoRA .safetensors file)")


def test_a_missing_single_file_checkpoint_is_named_in_the_one_form(tmp_path, monkeypatch):
    """It said "single-file checkpoint not found: <path as given>": relative, without the Windows-path hint."""
    from pti_plugin.models.single_file import read_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        read_checkpoint("D:\\models\\v1-5.safetensors")
    message = str(error.value)
    assert message.startswith(f"single-file checkpoint not found: looked for {tmp_path / 'D:'}")
    assert "it looks like a Windows path (drive D:)" in message and "/mnt/d/models/v1-5.safetensors" in message


def test_a_missing_sentence_file_is_named_in_the_one_form(tmp_path, monkeypatch):
    """It said "sentence file not found: <absolute path>", without the Windows-path hint."""
    from pti_plugin.ellipsoid.prompts import read_sentences

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        read_sentences("captions\\train.json")
    assert str(error.value) == (f"sentence file not found: looked for {tmp_path / 'captions'}\\train.json; '\\' is part "
                                "of a file name here, not a folder separator: write 'captions/train.json' (forward "
                                "slashes, no trailing backslash)")


def test_a_runs_missing_lora_is_named_in_the_one_form(tmp_path):
    """It said "<path> not found: the run has not finished" (the run's own LoRA) or "<path> not found" (--lora_file)."""
    from pti_plugin.metrics.run_model import load_run

    (tmp_path / "pti.config.toml").write_text("")
    with pytest.raises(FileNotFoundError) as error:
        load_run(tmp_path)
    assert str(error.value) == (f"the run's LoRA not found: looked for {tmp_path / 'pti.safetensors'} "
                                "(the run has not finished)")
    with pytest.raises(FileNotFoundError) as error:
        load_run(tmp_path, lora_file=tmp_path / "pti-step00000010.safetensors")
    assert str(error.value) == f"LoRA file not found: looked for {tmp_path / 'pti-step00000010.safetensors'}"


# ----------------------------------------------------------------------------- the dataset preview

def test_the_previews_dataset_config_replaces_the_presets_folder_as_training_says(tiny_model, tmp_path, capsys, caplog):
    """The preview blanked the preset's train_data_dir itself, before the config loader's rule could: the same
    dataset shown, but without the notice training gives ("--dataset_config replaces the preset's train_data_dir")."""
    from pti_plugin.dataset_preview import main as preview_main

    for name, caption in (("preset_images", "tok1, red hair"), ("config_images", "tok1, smile")):
        (tmp_path / name / "1_tok1").mkdir(parents=True)
        draw_character(tmp_path / name / "1_tok1" / "0.png", 0)
        (tmp_path / name / "1_tok1" / "0.txt").write_text(caption)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "config_images" / "1_tok1"}"\n')
    preset = tmp_path / "preset.toml"
    preset.write_text(f'pretrained_model_name_or_path = "{tiny_model}"\ntrain_data_dir = "{tmp_path / "preset_images"}"\n'
                      "resolution = 32\n")
    with caplog.at_level(logging.WARNING):
        assert preview_main(["--preset", str(preset), "--dataset_config", str(dataset), "--n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "tok1, smile" in shown and "red hair" not in shown
    assert f"--dataset_config replaces the preset's train_data_dir = '{tmp_path / 'preset_images'}'" in caplog.text
