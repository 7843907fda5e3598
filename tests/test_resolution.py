"""One resolved configuration: which key reaches which stage, refused unused values, data-source
replacement, refused unrunnable choices. No model loads here."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import toml

from pti_plugin.cli import main, parse_args
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config, load_config
from pti_plugin.resolution import resolved_dict, with_epoch_steps

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "presets" / "demo.toml")


def _preset(tmp_path, text: str) -> str:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    path = tmp_path / "p.toml"
    path.write_text('train_data_dir = "imgs"\n' + text)
    return str(path)


def _load(argv: list[str]):
    return load_config(*parse_args(argv))


def test_a_flag_every_stage_shadows_is_refused_with_the_command_that_works(capsys):
    assert main(["--preset", DEMO, "--learning_rate", "1e-2"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate = 0.01 (command line) is used by no stage" in err
    assert "stages.0.learning_rate = 0.005" in err and "stages.1.learning_rate = 0.001" in err
    assert "--set stages.0.learning_rate=0.01" in err and "--set stages.1.learning_rate=0.01" in err
    assert main(["--preset", DEMO, "--max_train_steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "max_train_steps = 5 (command line) is used by no stage: stages.0.steps = 150; stages.1.steps = 150" in err
    # the suggested command does what the flag could not
    config = _load(["--preset", DEMO, "--set", "stages.1.learning_rate=0.01"])
    assert [s.learning_rate for s in config.stages] == [5e-3, 1e-2]


def test_a_top_level_preset_key_every_stage_shadows_is_refused(tmp_path):
    path = _preset(tmp_path, 'optimizer_type = "SGD"\n[[stages]]\nkind = "inversion"\noptimizer_type = "AdamW"\n')
    with pytest.raises(ConfigError, match=re.escape("optimizer_type = \"SGD\" (preset) is used by no stage: "
                                                    "stages.0.optimizer_type = 'AdamW'")):
        load_config(path)
    # the same shadowing made by a --set of the stage is what the user asked for: accepted
    path = _preset(tmp_path, 'optimizer_type = "SGD"\n[[stages]]\nkind = "inversion"\n')
    assert load_config(path, {}, ["stages.0.optimizer_type=AdamW"]).stages[0].optimizer_type == "AdamW"


def test_top_level_keys_reach_the_stages_that_do_not_set_them(tmp_path):
    path = _preset(tmp_path, 'lr_scheduler = "cosine"\nlr_warmup_steps = 3\n'
                   '[[stages]]\nkind = "inversion"\nsteps = 5\n'
                   '[[stages]]\nkind = "lora"\nlr_scheduler = "linear"\n')
    config = load_config(path, {"learning_rate": 2e-3, "max_train_steps": 9})
    assert [(s.learning_rate, s.lr_scheduler, s.lr_warmup_steps, s.steps) for s in config.stages] == [
        (2e-3, "cosine", 3, 5), (2e-3, "linear", 3, 9)]


def test_built_in_stages_take_a_given_learning_rate_else_their_own():
    assert [(s.kind, s.learning_rate) for s in _load(["--train_data_dir", str(REPO)]).stages] == [
        ("inversion", 5e-3), ("lora", 1e-4)]
    assert [s.learning_rate for s in _load(["--train_data_dir", str(REPO), "--learning_rate", "3e-3"]).stages] == [3e-3, 3e-3]
    sets = _load(["--train_data_dir", str(REPO), "--learning_rate", "3e-3", "--set", "stages.1.steps=4"])
    assert [(s.learning_rate, s.steps) for s in sets.stages] == [(3e-3, 1000), (3e-3, 4)]


STAGES = ('[[stages]]\nname = "inv"\nkind = "inversion"\n'
          '[[stages]]\nname = "both"\nkind = "lora"\ntrain_text_encoder = true\n'
          '[[stages]]\nname = "own_unet"\nkind = "lora"\nunet_lr = 3e-4\n'
          '[[stages]]\nname = "te_only"\nkind = "lora"\ntrain_unet = false\ntrain_text_encoder = true\ntext_encoder_lr = 7e-4\n')


def test_kohya_shorthands_reach_exactly_the_documented_lora_groups(tmp_path):
    config = load_config(_preset(tmp_path, "learning_rate = 1e-4\n" + STAGES),
                         {"unet_lr": 1e-3, "text_encoder_lr": 2e-3})
    groups = {s.name: dict(s.groups()) for s in config.stages}
    assert groups == {
        "inv": {"pivot": 1e-4},  # inversion stages: untouched
        "both": {"unet_lora": 1e-3, "text_encoder_lora": 2e-3},
        "own_unet": {"unet_lora": 3e-4},  # its own unet_lr wins; it trains no text-encoder LoRA
        "te_only": {"text_encoder_lora": 7e-4},  # its own text_encoder_lr wins
    }
    without = load_config(_preset(tmp_path, "learning_rate = 1e-4\n" + STAGES))
    assert dict(without.stages[1].groups()) == {"unet_lora": 1e-4, "text_encoder_lora": 1e-4}  # else learning_rate


def test_a_shorthand_no_lora_stage_can_use_is_refused(tmp_path):
    path = _preset(tmp_path, '[[stages]]\nkind = "inversion"\n[[stages]]\nkind = "lora"\n')
    with pytest.raises(ConfigError, match=re.escape("text_encoder_lr = 0.002 (command line) is used by no stage: "
                                                    "stages.0 ('inversion0') is an inversion stage; "
                                                    "stages.1.train_text_encoder = false")):
        load_config(path, {"text_encoder_lr": 2e-3})
    config = load_config(path, {"text_encoder_lr": 2e-3, "network_train_unet_only": False})
    assert dict(config.stages[1].groups())["text_encoder_lora"] == 2e-3


def test_stage_length_own_steps_win_and_epochs_become_steps_once_the_data_is_scanned(tmp_path, caplog):
    path = _preset(tmp_path, 'max_train_epochs = 3\n[[stages]]\nkind = "inversion"\nsteps = 5\n'
                   '[[stages]]\nkind = "lora"\n[[stages]]\nname = "x"\nkind = "lora"\nmax_train_epochs = 2\n')
    config = load_config(path)
    assert [(s.steps, s.max_train_epochs) for s in config.stages] == [(5, None), (None, 3), (None, 2)]
    assert [s.steps for s in with_epoch_steps(config, 7).stages] == [5, 21, 14]
    with caplog.at_level(logging.WARNING):  # kohya: max_train_epochs overrides max_train_steps
        assert load_config(path, {"max_train_steps": 9}).stages == config.stages
    assert ("max_train_epochs = 3 (preset) replaces max_train_steps = 9 (command line), as in kohya (\"override steps\"): "
            "stages.0.steps = 5; stages.1 follows max_train_epochs = 3; stages.2.max_train_epochs = 2. To give a stage 9 "
            "steps instead, use --set stages.0.steps=9 (inversion stage 'inversion0') or --set stages.1.steps=9 (lora "
            "stage 'lora1').") in caplog.text
    with pytest.raises(ConfigError, match="key 'stages.2.max_train_epochs': stages.2 also sets steps"):
        load_config(path, sets=["stages.2.steps=4"])


def test_resolved_toml_reloads_to_the_same_stages(tmp_path):
    config = with_epoch_steps(load_config(_preset(tmp_path, "unet_lr = 1e-3\nlearning_rate = 2e-4\n" + STAGES)), 4)
    path = tmp_path / "resolved.toml"
    path.write_text(toml.dumps(resolved_dict(config)))
    assert load_config(path).stages == config.stages  # no top-level value left over to shadow


def test_command_line_data_source_replaces_the_presets_other_one(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    dataset = tmp_path / "d.toml"
    dataset.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    path = _preset(tmp_path, "")
    with caplog.at_level(logging.WARNING):
        config = load_config(path, {"dataset_config": str(dataset)})
    assert (config.dataset_config, config.train_data_dir) == (str(dataset), "")
    assert f"--dataset_config replaces the preset's train_data_dir = '{tmp_path / 'imgs'}'" in caplog.text
    config = load_config(_dataset_preset(tmp_path, dataset),
                         {"train_data_dir": str(tmp_path / "imgs")})
    assert (config.dataset_config, config.train_data_dir) == ("", str(tmp_path / "imgs"))
    with pytest.raises(ConfigError, match="set only one of 'train_data_dir' and 'dataset_config'"):
        load_config(None, {"train_data_dir": str(tmp_path / "imgs"), "dataset_config": str(dataset)})


def _dataset_preset(tmp_path, dataset) -> str:
    path = tmp_path / "with_dataset.toml"
    path.write_text(f'dataset_config = "{dataset}"\n')
    return str(path)


@pytest.mark.parametrize("raw, message", [
    ({"lr_scheduler": "reduce_lr_on_plateau"}, "scheduler 'reduce_lr_on_plateau' is not supported by pti-plugin"),
    ({"stages": [{"kind": "inversion", "lr_scheduler": "reduce_lr_on_plateau"}]}, "key 'stages.0.lr_scheduler'"),
    ({"save_model_as": "ckpt"}, "key 'save_model_as' must be one of ['safetensors']"),
    ({"stages": [{"kind": "lora", "train_unet": False}]}, "key 'stages.0.train_pivot': stage 'lora0' trains nothing"),
])
def test_choices_that_cannot_run_are_refused_at_validation(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({"train_data_dir": str(tmp_path)} | raw)


def test_an_optimizer_whose_package_is_missing_is_refused_by_name(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("key 'stages.0.optimizer_type': 'AdamW8bit' needs the bitsandbytes "
                                                    "package (pip install bitsandbytes)")):
        build_config({"train_data_dir": str(tmp_path), "stages": [{"kind": "inversion", "optimizer_type": "AdamW8bit"}]})


def test_a_lora_only_run_with_an_untrained_pivot_warns_and_pivot_locality_is_refused(tmp_path, caplog):
    lora_only = '[[stages]]\nname = "lora"\nkind = "lora"\nsteps = 2\nlearning_rate = 1e-3\n'
    with caplog.at_level(logging.WARNING, logger="pti_plugin.config_checks"):
        config = _load(["--preset", _preset(tmp_path, lora_only)])
    assert [s.kind for s in config.stages] == ["lora"]
    assert any("stays its init word" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"plugins\.pivot_locality needs a learned pivot.*Add an inversion stage"):
        _load(["--preset", _preset(tmp_path, lora_only + "[plugins.pivot_locality]\nweight = 1.0\n")])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pti_plugin.config_checks"):
        _load(["--preset", _preset(tmp_path, "")])  # the default stages train the pivot first: no warning
    assert not any("stays its init word" in r.getMessage() for r in caplog.records)


def test_a_typed_learning_rate_that_every_group_rate_replaces_is_refused(tmp_path):
    """``--set stages.0.learning_rate=0.5`` on a stage whose groups have their own rates (a reloaded run.config.toml
    sets unet_lr) was shown in the stage line but trained nothing at 0.5; the same keys in a preset stay accepted,
    as kohya configs write learning_rate beside unet_lr and text_encoder_lr."""
    from pti_plugin.config_loading import load_config

    preset = tmp_path / "p.toml"
    preset.write_text(f'train_data_dir = "{tmp_path}"\nlearning_rate = 1e-3\nunet_lr = 1e-4\nnetwork_train_unet_only = true\n'
                      '[[stages]]\nkind = "lora"\nsteps = 5\n')
    assert load_config(preset).stages[0].unet_lr == 1e-4  # the preset's own learning_rate beside unet_lr: fine
    preset.write_text(f'train_data_dir = "{tmp_path}"\nunet_lr = 1e-4\nnetwork_train_unet_only = true\n'
                      '[[stages]]\nkind = "lora"\nsteps = 5\n')
    with pytest.raises(ConfigError, match=r"stages\.0\.learning_rate = 0\.5 \(--set\) reaches no parameter group of stages\.0 "
                                          r"\('lora0'\): its groups take unet_lr = 0\.0001\. To change them, use "
                                          r"--set stages\.0\.unet_lr=0\.5\."):
        load_config(preset, {}, ["stages.0.learning_rate=0.5"])
    with pytest.raises(ConfigError, match=r"learning_rate = 0\.5 \(command line\) is used by no stage: stages\.0's groups "
                                          r"take unet_lr = 0\.0001\. No stage can use it"):
        load_config(preset, {"learning_rate": 0.5})
    preset.write_text(f'train_data_dir = "{tmp_path}"\nunet_lr = 1e-4\n[[stages]]\nkind = "lora"\nsteps = 5\n'
                      'train_text_encoder = true\n')
    assert load_config(preset, {}, ["stages.0.learning_rate=0.5"]).stages[0].text_encoder_lr == 0.5  # reaches the TE
