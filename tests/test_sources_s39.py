"""Where each setting came from, said at the top of a run: every setting not at its default with the layer that gave
it (each preset of an ``extends`` chain by its file name, a preset's own kohya config_file, a ``--config_file``, the
command line, ``--set``), and each value a later layer replaced, old -> new with both sources. The start-up block named
no source (a precedence audit: network_dim 32 from gui.toml over sd15_base's 16 went unsaid). Config-level: no model
loads (the run's own printing with the trainer stood in for)."""

from __future__ import annotations

from pathlib import Path

from pti_plugin.command_line import parse_args
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import load_config

REPO = Path(__file__).resolve().parents[1]
STAGES = ('[[stages]]\nname = "inv"\nkind = "inversion"\nsteps = 2\nlearning_rate = 5e-3\n'
          '[[stages]]\nname = "lo"\nkind = "lora"\nsteps = 2\nlearning_rate = 1e-3\n')


def _lines(tmp_path, argv: list[str]) -> list[str]:
    from pti_plugin.setting_sources import Origins, sources_lines

    sources = Origins()
    load_config(*parse_args(argv), data_only=True, sources=sources)
    return sources_lines(sources)


def _shown_path(path: Path) -> str:
    """A path as the lines show it: quoted, and over 40 characters so its last 35 characters after '"...'."""
    text = f'"{path}"'
    return text if len(text) <= 40 else f'"...{str(path)[-35:]}"'


def test_each_setting_names_its_layer_and_each_replaced_value_its_old_one(tmp_path, monkeypatch):
    """base.toml <- its extender child.toml, whose own config_file k.toml lies between them; a --config_file top.toml
    over both; a flag; a top-level --set and a stage's --set."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "base.toml").write_text('train_data_dir = "data"\nnetwork_dim = 16\nnetwork_alpha = 8.0\nseed = 1\n'
                                        'train_batch_size = 1\n' + STAGES)  # train_batch_size: the default, unsaid
    (tmp_path / "k.toml").write_text('[model]\nnetwork_dim = 32\nnoise_offset = 0.05\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nconfig_file = "k.toml"\noutput_name = "child"\nseed = 2\n')
    (tmp_path / "top.toml").write_text('min_snr_gamma = 5\n')
    lines = _lines(tmp_path, ["--preset", "child.toml", "--config_file", "top.toml", "--network_dim", "8",
                              "--set", "seed=3", "--set", "stages.1.learning_rate=2e-4"])
    assert lines == [
        f"settings from preset base.toml: train_data_dir = {_shown_path(tmp_path / 'data')}, network_alpha = 8, "
        "stages = [2 tables]; config_file k.toml: noise_offset = 0.05; preset child.toml: output_name = \"child\"; "
        "config_file top.toml: min_snr_gamma = 5; command line: network_dim = 8; --set: seed = 3, "
        "stages.1.learning_rate = 0.0002",
        "replaced: network_dim 16 (preset base.toml) -> 32 (config_file k.toml) -> 8 (command line); "
        "seed 1 (preset base.toml) -> 2 (preset child.toml) -> 3 (--set); "
        "stages.1.learning_rate 0.001 (preset base.toml) -> 0.0002 (--set)",
    ]


def test_a_replaced_data_source_and_a_plugin_table(tmp_path, monkeypatch):
    """A data source the command line replaced is not named as a setting (its warning names it); a plugin's options
    are each named by their path; a value written again unchanged replaces nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "d.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data"\n')
    (tmp_path / "p.toml").write_text('train_data_dir = "data"\nnetwork_dim = 8\n[plugins.pivot_locality]\nweight = 0.5\n'
                                     + STAGES)
    lines = _lines(tmp_path, ["--preset", "p.toml", "--dataset_config", "d.toml", "--network_dim", "8",
                              "--set", "plugins.pivot_locality.weight=2.0"])
    assert lines == [
        "settings from preset p.toml: stages = [2 tables]; command line: network_dim = 8, dataset_config = "
        f"{_shown_path(tmp_path / 'd.toml')}; --set: plugins.pivot_locality.weight = 2",
        "replaced: plugins.pivot_locality.weight 0.5 (preset p.toml) -> 2 (--set)",
    ]


def test_the_demo_run_adds_two_lines_before_its_start_up_block(tmp_path, monkeypatch, capsys):
    """train_pti.py prints them once the settings are read (the demo's README command, with test_demo's flags), at
    most six settings a source, the rest counted; a refusal after them is unchanged."""
    import pti_plugin.trainer
    from pti_plugin.cli import main

    def refused(config):
        raise ConfigError("stand-in for the trainer's first refusal")

    monkeypatch.setattr(pti_plugin.trainer, "Trainer", refused)
    monkeypatch.chdir(tmp_path)
    code = main(["--preset", str(REPO / "presets" / "demo.toml"), "--output_dir", "demo", "--sample_steps", "2",
                 "--set", "stages.0.steps=2", "--set", "stages.1.steps=2"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err == "error: stand-in for the trainer's first refusal\n"
    assert captured.out.splitlines() == [
        'settings from preset demo.toml: train_data_dir = "@embedded", resolution = 32, train_batch_size = 4, '
        'output_name = "demo", network_alpha = 4, save_precision = "float" and 3 more; command line: output_dir = '
        '"demo", sample_steps = 2; --set: stages.0.steps = 2, stages.1.steps = 2',
        'replaced: output_dir "outputs/demo" (preset demo.toml) -> "demo" (command line); '
        "sample_steps 25 (preset demo.toml) -> 2 (command line); stages.0.steps 150 (preset demo.toml) -> 2 (--set); "
        "stages.1.steps 150 (preset demo.toml) -> 2 (--set)",
    ]
