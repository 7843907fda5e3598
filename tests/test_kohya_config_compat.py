"""kohya config files that load: the deprecated optimizer switches, the options that ask for what pti-plugin does,
network_train_text_encoder_only and log_config.

The expectations are kohya sd-scripts' own, written out here: ``train_util.get_optimizer`` (``use_8bit_adam`` is
``optimizer_type = "AdamW8bit"``, ``use_lion_optimizer`` is ``"Lion"``; either beside the other or beside a non-empty
``optimizer_type`` is an assertion), ``train_network.py`` (``train_unet = not network_train_text_encoder_only``; the
text encoder trains unless ``network_train_unet_only``, kohya's default false) and ``get_sanitized_config_or_none``
(``log_config``: the arguments as hyperparameters, paths of the user's folders left out, lists as their ``str()``).
"""

from __future__ import annotations

import pytest

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config, load_config
from pti_plugin.kohya_options import REFUSED_OPTIONS
from pti_plugin.resolution import resolved_dict, tracker_hparams, training_metadata


def _stages(config):
    return [(s.name, s.optimizer_type) for s in config.stages]


def test_a_kohya_config_file_with_a_deprecated_optimizer_switch_loads(tmp_path):
    (tmp_path / "kohya.toml").write_text("[optimizer_arguments]\nuse_8bit_adam = true\nlearning_rate = 1e-3\n")
    (tmp_path / "p.toml").write_text(f'config_file = "kohya.toml"\ntrain_data_dir = "{tmp_path}"\n'
                                     '[[stages]]\nname = "inv"\nkind = "inversion"\noptimizer_type = "SGD"\n'
                                     '[[stages]]\nname = "lora"\nkind = "lora"\n')
    config = load_config(tmp_path / "p.toml")
    # a top-level kohya key is the default of every stage without its own
    assert _stages(config) == [("inv", "SGD"), ("lora", "AdamW8bit")]
    assert not {"use_8bit_adam", "use_lion_optimizer"} & set(REFUSED_OPTIONS)
    # the resolved config (written beside the outputs, read back by --resume) loads to the same optimizers
    assert _stages(build_config(resolved_dict(config), check_paths=False)) == [("inv", "SGD"), ("lora", "AdamW8bit")]
    assert training_metadata(config)["ss_optimizer"].startswith("AdamW8bit")

    lion = build_config({"train_data_dir": str(tmp_path), "use_lion_optimizer": True})
    assert _stages(lion) == [("inversion", "Lion"), ("lora", "Lion")]
    # kohya: an empty optimizer_type is unset, so the switch sets it
    empty = build_config({"train_data_dir": str(tmp_path), "use_8bit_adam": True, "optimizer_type": ""})
    assert _stages(empty) == [("inversion", "AdamW8bit"), ("lora", "AdamW8bit")]


def test_the_switch_builds_bitsandbytes_adamw8bit(tmp_path):
    import torch

    from pti_plugin.optimizers import build_optimizer

    config = build_config({"train_data_dir": str(tmp_path), "use_8bit_adam": True})
    weight = torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer(config.stages[1].optimizer_type, [{"params": [weight]}], 1e-3, [])
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == "bitsandbytes.optim.adamw.AdamW8bit"


@pytest.mark.parametrize("extra, key, message", [
    # kohya asserts "both option use_8bit_adam and optimizer_type are specified", whatever the optimizer_type
    ({"use_8bit_adam": True, "optimizer_type": "AdamW"}, "use_8bit_adam", "beside optimizer_type = 'AdamW'"),
    ({"use_lion_optimizer": True, "optimizer_type": "Lion"}, "use_lion_optimizer", "beside optimizer_type = 'Lion'"),
    ({"use_8bit_adam": True, "use_lion_optimizer": True}, "use_lion_optimizer", "beside use_8bit_adam = true"),
    ({"use_8bit_adam": True, "stages": [{"kind": "inversion", "optimizer_type": "SGD"}]}, "use_8bit_adam",
     "reaches no stage: stages.0.optimizer_type = 'SGD'"),
])
def test_a_switch_beside_another_optimizer_choice_is_refused_naming_it(tmp_path, extra, key, message):
    with pytest.raises(ConfigError) as caught:
        build_config({"train_data_dir": str(tmp_path)} | extra)
    assert caught.value.key == key and message in str(caught.value)


def test_a_switch_on_the_command_line_is_named_as_typed(tmp_path):
    (tmp_path / "p.toml").write_text(f'train_data_dir = "{tmp_path}"\noptimizer_type = "SGD"\n')
    with pytest.raises(ConfigError, match=r"^--use_8bit_adam \(command line\) = true .* beside optimizer_type = 'SGD'"):
        load_config(tmp_path / "p.toml", {"use_8bit_adam": True})


def test_no_half_vae_and_highvram_true_load_and_lowram_stays_refused(tmp_path, caplog):
    base = {"train_data_dir": str(tmp_path)}
    with caplog.at_level("INFO", logger="pti_plugin.config"):
        config = build_config(base | {"no_half_vae": True, "highvram": True})
    assert config == build_config(base)  # nothing changes: the VAE is float32, the CUDA cache is never cleared
    assert "no_half_vae = True asks for nothing" in caplog.text and "highvram = True asks for nothing" in caplog.text
    with pytest.raises(ConfigError, match="kohya option 'lowram' is not supported by pti-plugin: the model is loaded "
                                          "into RAM and then moved to the device"):
        build_config(base | {"lowram": True})
    with pytest.raises(ConfigError, match="kohya option 'highvram' is not supported"):
        build_config(base | {"highvram": 1})  # a number is no switch


def _trains(config):
    return [(s.name, s.train_pivot, s.train_unet, s.train_text_encoder) for s in config.stages]


def test_mem_eff_attn_is_pytorch_sdpa_before_xformers_as_kohyas_order(tmp_path):
    """kohya's replace_unet_modules takes mem_eff_attn before xformers and sdpa: here PyTorch SDPA, xformers off."""
    base = {"train_data_dir": str(tmp_path)}
    config = build_config(base | {"mem_eff_attn": True, "sdpa": False, "xformers": True})
    assert (config.sdpa, config.xformers, config.mem_eff_attn) == (True, False, False)
    assert config == build_config(base | {"sdpa": True})  # the resolved config reads back as plain sdpa


def test_network_train_text_encoder_only_trains_the_text_encoder_lora_in_every_lora_stage(tmp_path):
    stages = [{"name": "inv", "kind": "inversion"}, {"name": "te", "kind": "lora"},
              {"name": "both", "kind": "lora", "train_unet": True}]
    base = {"train_data_dir": str(tmp_path), "network_train_text_encoder_only": True, "stages": stages}
    expected = [("inv", True, False, False), ("te", False, False, True), ("both", False, True, True)]
    config = build_config(base)
    assert _trains(config) == expected  # kohya's network_train_unet_only defaults to false: the text encoder trains
    assert "network_train_text_encoder_only" not in REFUSED_OPTIONS
    assert _trains(build_config(base | {"network_train_unet_only": False})) == expected
    assert _trains(build_config(resolved_dict(config), check_paths=False)) == expected  # the resolved config reloads
    assert training_metadata(config)["ss_network_train_unet_only"] == "False"
    with pytest.raises(ConfigError) as caught:  # kohya would build no LoRA module and stop on an empty parameter list
        build_config(base | {"network_train_unet_only": True})
    assert caught.value.key == "network_train_text_encoder_only" and "network_train_unet_only = true" in str(caught.value)


def test_network_train_text_encoder_only_that_no_stage_uses_is_refused(tmp_path):
    (tmp_path / "p.toml").write_text(f'train_data_dir = "{tmp_path}"\nnetwork_train_text_encoder_only = true\n'
                                     '[[stages]]\nkind = "inversion"\n[[stages]]\nkind = "lora"\ntrain_unet = true\n')
    with pytest.raises(ConfigError, match=r"network_train_text_encoder_only = true \(preset\) is used by no stage: "
                                          r"stages.0 \('inversion0'\) is an inversion stage; stages.1.train_unet = True. "
                                          r"To change a stage, use --set stages.1.train_unet=false."):
        load_config(tmp_path / "p.toml")


def _hparams(folder):
    """The hyperparameters TensorBoard's event files under ``folder`` hold (the hparams plugin's session start)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for path in folder.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    found |= {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
    return found


def test_log_config_writes_the_settings_to_tensorboard_without_the_folders(preset, tmp_path, tiny_model, tiny_dataset):
    from pti_plugin.trainer import Trainer

    raw = preset(log_with="tensorboard", logging_dir=str(tmp_path / "tb"), log_config=True, seed=7,
                 init_word=["character"], stages=[{"kind": "inversion", "steps": 1, "learning_rate": 1e-2}])
    Trainer(build_config(raw)).run()
    hparams = _hparams(tmp_path / "tb")
    # top-level settings as they are (TensorBoard stores numbers and bools as numbers), a list as its str() (kohya)
    assert hparams["seed"] == 7 and hparams["network_dim"] == 4 and hparams["token_string"] == "tok1"
    assert hparams["log_config"] == 1 and hparams["init_word"] == "['character']" and hparams["base_weights"] == "[]"
    assert hparams["stages.0.steps"] == 1 and hparams["stages.0.kind"] == "inversion"  # the stages, as without it
    # kohya's masked keys (tokenizer_cache_dir is our tokenizer_path) are left out, and no folder of the run shows
    masked = {"pretrained_model_name_or_path", "vae", "tokenizer_path", "train_data_dir", "reg_data_dir", "output_dir",
              "logging_dir"}
    assert not masked & set(hparams)
    folders = (str(tmp_path), str(tiny_model), str(tiny_dataset))
    assert not [v for v in hparams.values() if isinstance(v, str) and any(f in v for f in folders)]

    without = build_config(preset(log_with="tensorboard"))  # off: only the stages, as before
    assert tracker_hparams(without) and all(key.startswith("stages.") for key in tracker_hparams(without))


def test_log_config_needs_a_tracker(preset, tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(preset(log_config=True))  # kohya would log nothing, silently
    assert caught.value.key == "log_config" and 'log_config\' = true needs a tracker: set log_with = "tensorboard"' in str(
        caught.value)
    assert build_config(preset(log_config=True, logging_dir=str(tmp_path / "tb"))).log_with == "tensorboard"  # kohya's


def test_a_text_encoder_only_run_trains_only_the_text_encoder_lora(preset, tmp_path):
    from safetensors import safe_open

    from pti_plugin.trainer import Trainer

    Trainer(build_config(preset(network_train_text_encoder_only=True, stages=[
        {"kind": "inversion", "steps": 1, "learning_rate": 1e-2}, {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]))).run()
    with safe_open(str(tmp_path / "out" / "pti.safetensors"), framework="pt") as handle:
        ups = {k: handle.get_tensor(k) for k in handle.keys() if k.endswith(".lora_up.weight")}
    unet = [v for k, v in ups.items() if k.startswith("lora_unet_")]
    text = [v for k, v in ups.items() if k.startswith("lora_te_")]
    assert text and any(bool(v.any()) for v in text)  # the text-encoder LoRA moved from its zero start
    assert not unet  # no UNet LoRA at all, as kohya's file (tests/test_trainer_split_fixes.py)


def _load_through_kohya_file(tmp_path, kohya_lines: str, preset_lines: str = "", caplog=None):
    """A preset naming a kohya config file (``train_data_dir = "imgs"``, ``resolution = "512,512"`` and
    ``kohya_lines``) beside ``preset_lines``, loaded with the resolution's warnings captured."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "kohya.toml").write_text('train_data_dir = "imgs"\nresolution = "512,512"\n' + kohya_lines)
    (tmp_path / "p.toml").write_text('config_file = "kohya.toml"\n' + preset_lines)
    with caplog.at_level("WARNING", logger="pti_plugin.resolution"):
        return load_config(tmp_path / "p.toml")


def test_a_kohya_config_files_unused_rate_is_a_warning_where_a_presets_is_refused(tmp_path, caplog):
    """kohya's GUI writes text_encoder_lr beside network_train_unet_only = true, and kohya ignores it: from a kohya
    config_file such a value is warned about and the run goes on; the same value in our preset is still refused."""
    config = _load_through_kohya_file(tmp_path, "network_train_unet_only = true\ntext_encoder_lr = 5e-5\nunet_lr = 1e-4\n"
                                      "learning_rate = 1e-4\n", caplog=caplog)
    assert not config.stages[1].train_text_encoder and config.stages[1].unet_lr == 1e-4
    assert f"text_encoder_lr = 5e-05 (config_file {tmp_path / 'kohya.toml'}) is used by no stage" in caplog.text
    assert "kohya ignores it" in caplog.text
    (tmp_path / "own.toml").write_text(f'train_data_dir = "{tmp_path / "imgs"}"\nnetwork_train_unet_only = true\n'
                                       "text_encoder_lr = 5e-5\n")
    with pytest.raises(ConfigError, match=r"text_encoder_lr = 5e-05 \(preset\) is used by no stage"):
        load_config(tmp_path / "own.toml")


def test_a_kohya_files_text_encoder_lr_without_its_unet_only_switch_says_kohya_would_train_it(tmp_path, caplog):
    """kohya's network_train_unet_only defaults to false, so a kohya file with text_encoder_lr and no such switch trains
    a text-encoder LoRA in kohya; ours defaults to true, and the warning must not claim kohya ignores the rate."""
    config = _load_through_kohya_file(tmp_path, "text_encoder_lr = 5e-5\nunet_lr = 1e-4\n", caplog=caplog)
    assert not config.stages[1].train_text_encoder
    assert "text_encoder_lr = 5e-05" in caplog.text and "kohya ignores it" not in caplog.text
    assert "kohya would train a text-encoder LoRA at this rate" in caplog.text
    assert "network_train_unet_only = false" in caplog.text


def test_the_presets_unet_only_switch_does_not_make_the_warning_say_kohya_ignores_the_files_rate(tmp_path, caplog):
    """What kohya does with the file's text_encoder_lr depends on the file alone: a network_train_unet_only in our
    preset beside it does not make kohya ignore the rate."""
    _load_through_kohya_file(tmp_path, "text_encoder_lr = 5e-5\n", "network_train_unet_only = true\n", caplog)
    assert "kohya would train a text-encoder LoRA at this rate" in caplog.text
