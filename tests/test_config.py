"""Presets: defaults, extends, kohya config_file, overrides, and errors that name the key."""

from __future__ import annotations

import re

import pytest

from pti_plugin.cli import main, parse_args
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config, load_config
from pti_plugin.kohya_options import REFUSED_OPTIONS


def _write(path, text):
    path.write_text(text)
    return path


def test_extends_merges_and_paths_are_relative_to_each_preset(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "imgs").mkdir()
    _write(tmp_path / "base" / "base.toml", 'train_data_dir = "imgs"\nlearning_rate = 1e-3\nnetwork_dim = 8\n')
    child = _write(tmp_path / "child.toml", 'extends = "base/base.toml"\nnetwork_dim = 16\n[[stages]]\nkind = "inversion"\nsteps = 7\n')
    config = load_config(child)
    assert config.train_data_dir == str(tmp_path / "base" / "imgs")
    assert (config.learning_rate, config.network_dim) == (1e-3, 16)
    assert [(s.kind, s.steps) for s in config.stages] == [("inversion", 7)]
    assert config.stages[0].learning_rate == 1e-3  # top-level keys are stage defaults


def test_a_kohya_config_file_with_refused_options_set_to_ask_for_nothing_loads(tmp_path):
    """kohya's --output_config writes every option: ``v2 = false``, ``network_module = "networks.lora"`` ... are
    left out; the same options asking for something are still refused by name."""
    (tmp_path / "imgs").mkdir()
    _write(tmp_path / "kohya.toml", '[model]\nv2 = false\nfull_fp16 = false\nvae = ""\n[network]\n'
           'network_module = "networks.lora"\nnetwork_dim = 8\n[loss]\nloss_type = "l2"\nbase_weights = []\n')
    preset = _write(tmp_path / "p.toml", 'config_file = "kohya.toml"\ntrain_data_dir = "imgs"\n')
    assert load_config(preset).network_dim == 8
    for line, key in (("v2 = true", "v2"), ('network_module = "lycoris.kohya"', "network_module"),
                      ('huggingface_repo_id = "a/b"', "huggingface_repo_id"), ("lowram = true", "lowram")):
        _write(tmp_path / "kohya.toml", f"[model]\n{line}\n")
        with pytest.raises(ConfigError, match=f"^config_file {re.escape(str(tmp_path / 'kohya.toml'))}: kohya option "
                                              f"'{key}' is not supported"):  # the file that set it, not "preset"
            load_config(preset)
    _write(tmp_path / "kohya.toml", "[training]\nclip_skip = 0\n")
    with pytest.raises(ConfigError, match=r"^config_file .*kohya\.toml: key 'clip_skip' must be > 0"):
        load_config(preset)
    _write(preset, 'config_file = "kohya.toml"\ntrain_data_dir = "imgs"\nclip_skip = -1\n')  # the preset's own wins
    with pytest.raises(ConfigError, match=r"^preset: key 'clip_skip' must be > 0"):
        load_config(preset)


@pytest.mark.parametrize("key", ["extends", "config_file"])
def test_an_extends_or_config_file_that_is_not_a_path_is_named(tmp_path, key):
    preset = _write(tmp_path / "p.toml", f"{key} = 5\n")
    with pytest.raises(ConfigError, match=f"key '{key}' expects the path of a TOML file, got 5"):
        load_config(preset)


def test_kohya_config_file_sections_are_flattened(tmp_path):
    (tmp_path / "imgs").mkdir()
    _write(tmp_path / "kohya.toml", '[model_arguments]\nclip_skip = 2\n[training_arguments]\ntrain_batch_size = 3\n[dataset_arguments]\ntrain_data_dir = "imgs"\n')
    preset = _write(tmp_path / "p.toml", 'config_file = "kohya.toml"\ntrain_batch_size = 4\n')
    config = load_config(preset)
    assert (config.clip_skip, config.train_batch_size, config.train_data_dir) == (2, 4, str(tmp_path / "imgs"))


def test_a_kohya_config_files_resolution_string_is_read_as_kohya_reads_it(tmp_path):
    """kohya keeps --resolution as the string its parser takes ("512" or "W,H"), and so do its config files (its
    --output_config and the GUI write resolution = "512,512")."""
    (tmp_path / "imgs").mkdir()
    for text, expected in (('"512,768"', [512, 768]), ('"640"', 640)):
        _write(tmp_path / "kohya.toml", f'train_data_dir = "imgs"\nresolution = {text}\n')
        assert load_config(_write(tmp_path / "p.toml", 'config_file = "kohya.toml"\n')).resolution == expected
    _write(tmp_path / "kohya.toml", 'train_data_dir = "imgs"\nresolution = "512x512"\n')
    with pytest.raises(ConfigError, match=r"^config_file .*kohya.toml: key 'resolution' expects a size as kohya writes "
                                          r"it, 'SIZE' or 'WIDTH,HEIGHT' in whole numbers, got '512x512'$"):
        load_config(_write(tmp_path / "p.toml", 'config_file = "kohya.toml"\n'))


def test_command_line_overrides_top_level_and_nested(tmp_path):
    preset_path, overrides, sets = parse_args(
        ["--preset", "x.toml", "--learning_rate", "1e-4", "--gradient_checkpointing", "--output_dir=o", "--set", "stages.1.steps=10"]
    )
    assert preset_path == "x.toml"
    assert overrides == {"learning_rate": 1e-4, "gradient_checkpointing": True, "output_dir": "o"}
    config = load_config(None, overrides | {"train_data_dir": str(tmp_path)}, sets)
    assert [s.steps for s in config.stages] == [1000, 10]  # stage 0 takes the default max_train_steps
    assert [s.learning_rate for s in config.stages] == [1e-4, 1e-4]  # a given learning_rate reaches the built-in stages


def test_kohya_multi_value_flags_and_sizes_reach_the_config(tmp_path):
    """kohya's command-line forms: a list option takes every value up to the next flag, a size takes W,H; the
    resolved config holds what a preset writing the same TOML would."""
    argv = ["--network_args", "conv_dim=4", "conv_alpha=1", "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99",
            "--resolution", "640,512", "--init_word", "girl", "--learning_rate", "-1e-4"]
    _, overrides, _ = parse_args(argv)
    assert overrides == {"network_args": ["conv_dim=4", "conv_alpha=1"], "optimizer_args": ["weight_decay=0.1", "betas=0.9,0.99"],
                         "resolution": [640, 512], "init_word": "girl", "learning_rate": -1e-4}
    overrides["learning_rate"] = 1e-4
    preset = _write(tmp_path / "p.toml", f'train_data_dir = "{tmp_path}"\nnetwork_args = ["conv_dim=4", "conv_alpha=1"]\n'
                    'optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]\nresolution = [640, 512]\n'
                    'init_word = "girl"\nlearning_rate = 1e-4\n')
    assert load_config(None, overrides | {"train_data_dir": str(tmp_path)}) == load_config(preset)
    assert parse_args(["--network_args=conv_dim=4"])[1] == {"network_args": ["conv_dim=4"]}
    assert parse_args(["--network_args", '["conv_dim=4"]', "--resolution", "512"])[1] == {"network_args": ["conv_dim=4"],
                                                                                      "resolution": 512}
    assert parse_args(["--network_args", "--gradient_checkpointing"])[1] == {"network_args": [], "gradient_checkpointing": True}


@pytest.mark.parametrize("key, value, reading", [
    ("learning_rate", "fast", "expects float, got 'fast'"),
    ("learning_rate", -1.0, "must be > 0, got -1.0"),
    ("network_dim", 0, "must be > 0, got 0"),
])
def test_a_bad_value_is_named_where_the_user_gave_it(tmp_path, key, value, reading):
    """The same bad value written in the preset is named as the preset's key, given as a flag as the flag
    (the user looks where they typed it); a bad preset value beside a good flag stays the preset's."""
    preset = _write(tmp_path / "p.toml", f"train_data_dir = {str(tmp_path)!r}\n{key} = {value!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=f"^preset: key '{key}' {reading}"):
        load_config(preset)
    clean = _write(tmp_path / "clean.toml", f"train_data_dir = {str(tmp_path)!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=f"^--{key} \\(command line\\) {reading}"):
        load_config(clean, {key: value})
    with pytest.raises(ConfigError, match=f"^preset: key '{key}' {reading}"):
        load_config(preset, {"output_dir": str(tmp_path / "out")})


def test_a_refused_or_unknown_flag_alone_is_named_as_the_command_lines(tmp_path):
    """kohya's value-less flags that pti-plugin refuses (``--full_fp16``) or does not know are refused by name as
    the command line's, not as 'needs a value'; a known key without its value still needs one; the same keys in
    a preset are named as the preset's."""
    _, overrides, _ = parse_args(["--full_fp16", "--lowram", "--learnig_rate", "1e-4"])
    assert overrides == {"full_fp16": True, "lowram": True, "learnig_rate": 1e-4}
    with pytest.raises(ConfigError, match=r"^command line: kohya option 'full_fp16' is not supported"):
        load_config(None, {"full_fp16": True, "train_data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'learnig_rate'\. Did you mean 'learning_rate'\?"):
        load_config(None, {"learnig_rate": 1e-4, "train_data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="^--learning_rate needs a value"):
        parse_args(["--learning_rate"])
    preset = _write(tmp_path / "p.toml", f'train_data_dir = "{tmp_path}"\nfull_fp16 = true\n')
    with pytest.raises(ConfigError, match=r"^preset: kohya option 'full_fp16' is not supported"):
        load_config(preset, {"seed": 1})


def test_a_bad_stage_value_given_with_set_is_named_as_the_set_path(tmp_path):
    """``--set stages.0.k=v`` with a bad value names ``--set stages.0.k``; the same value in the preset's stage
    keeps the preset's name."""
    clean = _write(tmp_path / "clean.toml", f'train_data_dir = "{tmp_path}"\n[[stages]]\nkind = "inversion"\n')
    with pytest.raises(ConfigError, match=r"^--set stages\.0\.learning_rate must be > 0, got -1\.0"):
        load_config(clean, {}, ["stages.0.learning_rate=-1"])
    with pytest.raises(ConfigError, match=r"^--set stages\.0\.steps expects int"):
        load_config(clean, {}, ["stages.0.steps=abc"])
    written = _write(tmp_path / "bad.toml", f'train_data_dir = "{tmp_path}"\n[[stages]]\nkind = "inversion"\nsteps = "abc"\n')
    with pytest.raises(ConfigError, match=r"^preset: key 'stages\.0\.steps' expects int"):
        load_config(written, {}, ["stages.0.learning_rate=1e-4"])


@pytest.mark.parametrize("overrides, sets, message", [
    ({"network_args": ["foo=1"]}, [], "--network_args (command line): entry 'foo=1': supported are conv_dim=N"),
    ({"network_args": ["conv_dim=0"]}, [], "--network_args (command line): conv_dim must be > 0"),
    ({}, ["stages.0.max_train_epochs=2"], "--set stages.0.max_train_epochs: stages.0 also sets steps; set one"),
    ({}, ["stages.0.kind=x"], "--set stages.0.kind must be one of ['inversion', 'lora'], got 'x'"),
    ({}, ["stages.0.train_pivot=false"], "--set stages.0.train_pivot: stage 'inversion0' trains nothing"),
    ({}, ["stages.0.foo=1"], "command line: unknown key 'stages.0.foo'."),
    ({}, ["stages.0.optimizer_type=foo"], "--set stages.0.optimizer_type: unknown optimizer 'foo'"),
    ({}, ["plugins.pivot_locality.weight=x"], "--set plugins.pivot_locality.weight expects float, got 'x'"),
    ({}, ["plugins.pivot_locality.foo=1"], "command line: unknown key 'plugins.pivot_locality.foo'."),
])
def test_a_bad_value_in_a_table_is_named_as_the_command_line_gave_it(tmp_path, overrides, sets, message):
    """Stage, plugin and network_args errors name the flag or ``--set`` path the user typed (these said
    ``preset:``, or a plugin's table with no origin, before)."""
    preset = _write(tmp_path / "p.toml", f'train_data_dir = "{tmp_path}"\n[[stages]]\nkind = "inversion"\nsteps = 5\n')
    with pytest.raises(ConfigError) as error:
        load_config(preset, overrides, sets)
    assert str(error.value).startswith(message)
    with pytest.raises(ConfigError, match=r"^preset: key 'stages\.0\.kind' must be one of"):  # the preset's own stays the preset's
        load_config(_write(tmp_path / "q.toml", f'train_data_dir = "{tmp_path}"\n[[stages]]\nkind = "x"\n'))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"learnig_rate": 1e-4}, "unknown key 'learnig_rate'. Did you mean 'learning_rate'?"),
        ({"v2": True}, "kohya option 'v2' is not supported"),
        ({"learning_rate": "fast"}, "key 'learning_rate' expects float, got 'fast'"),
        ({"train_batch_size": 1.5}, "key 'train_batch_size' expects int"),
        ({"mixed_precision": "fp8"}, "'mixed_precision' must be one of"),
        ({"stages": [{"kind": "lora", "stpes": 3}]}, "unknown key 'stages.0.stpes'. Did you mean 'steps'?"),
        ({"stages": [{"kind": "dreambooth"}]}, "key 'stages.0.kind' must be one of"),
        ({"output_name": "tok1"}, "the LoRA and the standalone embedding would be the same file"),
        ({"pretrained_model_name_or_path": "/no/such/model"}, "path not found: looked for /no/such/model"),
    ],
)
def test_bad_presets_name_the_key(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=_escape(message)):
        build_config({"train_data_dir": str(tmp_path)} | raw)


def _escape(text):
    import re

    return re.escape(text)


def test_every_refused_kohya_option_is_refused_by_name(tmp_path):
    for option in REFUSED_OPTIONS:
        with pytest.raises(ConfigError, match=f"kohya option '{option}' is not supported"):
            build_config({"train_data_dir": str(tmp_path), option: 1})


def test_cli_reports_config_errors_before_loading_any_model(tmp_path, capsys):
    preset = _write(tmp_path / "p.toml", f'train_data_dir = "{tmp_path}"\nnetwork_dimm = 4\n')
    assert main(["--preset", str(preset)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'network_dimm'" in err and "Did you mean 'network_dim'?" in err
    assert main(["--preset", str(tmp_path / "missing.toml")]) == 2
    assert "preset not found: looked for" in capsys.readouterr().err


def test_plugin_path_options_are_relative_to_the_preset(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "centre.safetensors").touch()  # a plugin's options are checked with the preset (the file must exist)
    preset = _write(tmp_path / "p.toml", 'train_data_dir = "imgs"\n[plugins.pivot_locality]\ncentre_file = "out/centre.safetensors"\nweight = 2.0\n')
    config = load_config(preset)
    assert config.plugins["pivot_locality"] == {"centre_file": str(tmp_path / "out" / "centre.safetensors"), "weight": 2.0}


def test_tensorboard_logging_without_the_package_is_refused(tmp_path, monkeypatch):
    import importlib.util

    build_config({"train_data_dir": str(tmp_path), "log_with": "tensorboard"})  # installed: accepted
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    with pytest.raises(ConfigError, match=_escape("""key 'log_with' = "tensorboard" needs the tensorboard package""")):
        build_config({"train_data_dir": str(tmp_path), "log_with": "tensorboard"})
    build_config({"train_data_dir": str(tmp_path), "log_with": ""})  # the JSONL log needs nothing


@pytest.mark.parametrize("changes, message", [
    ({"stages": [{"kind": "inversion"}, {"kind": "lora", "optimizer_args": ["eps=abc"]}]},
     "preset: key 'stages.1.optimizer_args': '<=' not supported"),
    ({"optimizer_args": ["foo=1"]}, "preset: key 'optimizer_args': AdamW.__init__() got an unexpected keyword argument 'foo'"),
    ({"optimizer_args": ["weight_decay=-1"]}, "preset: key 'optimizer_args': Invalid weight_decay value: -1"),
    ({"optimizer_type": "Adafactor", "optimizer_args": ["relative_step=True"]},
     "preset: key 'optimizer_args': Cannot combine manual `lr` and `relative_step=True` options (optimizer_type 'Adafactor')"),
    ({"lr_scheduler": "polynomial", "lr_scheduler_power": -1.0}, "preset: key 'lr_scheduler_power' must be > 0, got -1.0"),
    ({"lr_scheduler_num_cycles": 0}, "preset: key 'lr_scheduler_num_cycles' must be > 0, got 0"),
])
def test_optimizer_and_scheduler_settings_that_cannot_build_are_refused_with_the_preset(tmp_path, changes, message):
    """Refused when the preset is read (no model loaded). Before, a bad lora stage's optimizer_args stopped the run
    when that stage began, after the inversion stage had trained (and was not saved), and a negative polynomial
    power divided by zero mid-stage."""
    with pytest.raises(ConfigError) as error:
        build_config({"train_data_dir": str(tmp_path), **changes})
    assert str(error.value).startswith(message)


def test_good_optimizer_args_of_each_family_pass_the_preset_check(tmp_path):
    for optimizer, args in (("AdamW", ["betas=(0.9,0.99)", "weight_decay=0.1"]), ("AdamW8bit", ["betas=(0.9,0.99)"]),
                            ("Adafactor", ["scale_parameter=False"]), ("SGDNesterov", ["momentum=0.8"])):
        build_config({"train_data_dir": str(tmp_path), "optimizer_type": optimizer, "optimizer_args": args})


@pytest.mark.parametrize("path", ["stages.-1.steps", "stages.5.steps", "stages.x.steps"])
def test_a_set_into_a_stage_that_is_not_there_is_refused(tmp_path, path):
    """``stages.-1`` used to edit the last stage silently (Python's negative index)."""
    preset = _write(tmp_path / "p.toml", f'train_data_dir = "{tmp_path}"\n[[stages]]\nkind = "inversion"\n[[stages]]\nkind = "lora"\n')
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(path)}: no element '.+' in stages \(indices 0 to 1\)"):
        load_config(preset, {}, [f"{path}=3"])


def test_network_alpha_0_means_the_rank_as_in_kohya(tmp_path):
    config = build_config({"train_data_dir": str(tmp_path), "network_dim": 8, "network_alpha": 0})
    assert config.network_alpha == 8.0  # the resolved value: the LoRA's scale and its ss_network_alpha
    with pytest.raises(ConfigError, match="key 'network_alpha' must be >= 0, got -1.0"):
        build_config({"train_data_dir": str(tmp_path), "network_alpha": -1})


def test_more_vectors_than_the_text_window_holds_are_refused(tmp_path):
    """80 vectors only warned that the caption was truncated; the vectors past the window never trained."""
    with pytest.raises(ConfigError, match="key 'num_vectors_per_token' must be between 1 and max_token_length = 75 .*got 80"):
        build_config({"train_data_dir": str(tmp_path), "num_vectors_per_token": 80})
