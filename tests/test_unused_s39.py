"""Values the run does not use, said truthfully (no model loads here):

- a kohya config_file's ``learning_rate``/``max_train_steps`` that no stage uses: the warning says what kohya would do
  with it (the LoRA's default rate, the run's length) and what the lora stage does here; the hint lists the lora
  stage's ``--set`` first, never the inversion's for kohya's LoRA rate;
- a stage rate or switch for a group the stage does not train is refused naming the key and the switch, and the
  unused ``--text_encoder_lr`` hint names the switch (a ``--set`` of the stage's rate would be dropped);
- a stage's ``optimizer_args`` ``weight_decay`` decays the pivot (kohya's textual inversion), ``pivot_weight_decay``
  only where they give none, both refused; the pivot stays undecayed by default under AdamW's own 0.01;
- the ``--learning_rate`` refusal lists the lora stage first and kohya's ``--unet_lr``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import load_config
from pti_plugin.plugins.staged_schedule import StagedSchedule
from pti_plugin.resolution import training_metadata, with_length

STAGES = ('[[stages]]\nname = "inv"\nkind = "inversion"\nsteps = 10\nlearning_rate = 5e-3\n'
          '[[stages]]\nname = "lo"\nkind = "lora"\nsteps = 20\nlearning_rate = 1e-4\n')


def _preset(tmp_path, text: str = STAGES):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    path = tmp_path / "p.toml"
    path.write_text(f'train_data_dir = "{tmp_path / "imgs"}"\n' + text)
    return path


def _kohya_warnings(tmp_path, caplog, kohya_lines: str) -> list[str]:
    """The resolution's warnings for a kohya config_file with ``kohya_lines`` read over ``STAGES``."""
    (tmp_path / "k.toml").write_text(kohya_lines)
    with caplog.at_level(logging.WARNING, logger="pti_plugin.resolution"):
        load_config(_preset(tmp_path), {"config_file": str(tmp_path / "k.toml")})
    return [r.getMessage() for r in caplog.records if r.name == "pti_plugin.resolution"]


def test_a_kohya_files_learning_rate_and_max_train_steps_say_what_kohya_would_do(tmp_path, caplog):
    warnings = _kohya_warnings(tmp_path, caplog, "learning_rate = 2e-4\nmax_train_steps = 3\n")
    rate = next(w for w in warnings if w.startswith("learning_rate = 0.0002"))
    assert "kohya would train the UNet LoRA and text-encoder LoRA at 0.0002" in rate  # its default LoRA rate
    assert "here stage 'lo' trains its UNet LoRA at 0.0001" in rate
    assert "kohya ignores" not in rate and "stages.0.learning_rate=" not in rate  # never the inversion's
    assert rate.endswith("To change a stage, use --set stages.1.learning_rate=0.0002 (lora stage 'lo') or --unet_lr "
                         "0.0002 in place of learning_rate (kohya's LoRA rates; the inversion keeps its own).")
    steps = next(w for w in warnings if w.startswith("max_train_steps = 3"))
    assert "kohya would train 3 steps in all; here each stage runs its own length ('inv' 10 steps, 'lo' 20 steps)" in steps
    assert "kohya ignores" not in steps


def test_a_kohya_files_learning_rate_beside_both_lora_rates_is_one_kohya_ignores_too(tmp_path, caplog):
    warnings = _kohya_warnings(tmp_path, caplog, "learning_rate = 2e-4\nunet_lr = 3e-4\ntext_encoder_lr = 5e-5\n")
    rate = next(w for w in warnings if w.startswith("learning_rate = 0.0002"))
    assert "kohya trains no LoRA module at it either" in rate and "ss_learning_rate" in rate
    assert "here stage 'lo' trains its UNet LoRA at 0.0003" in rate
    assert rate.endswith("No lora stage can use it.") and "stages.0.learning_rate=" not in rate


def test_an_unused_text_encoder_lr_names_the_switch_and_the_hint_works(tmp_path):
    path = _preset(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"text_encoder_lr": 5e-5})
    message = str(caught.value)
    assert "stages.1.train_text_encoder = false by network_train_unet_only = true" in message
    assert message.endswith("To change a stage, use --set stages.1.train_text_encoder=true or --network_train_unet_only "
                            "false (lora stage 'lo' then trains its text-encoder LoRA at it).")
    assert "--set stages.1.text_encoder_lr" not in message
    for sets, flags in ((["stages.1.train_text_encoder=true"], {}), ([], {"network_train_unet_only": False})):
        config = load_config(path, {"text_encoder_lr": 5e-5} | flags, sets)
        assert dict(config.stages[1].groups()) == {"unet_lora": 1e-4, "text_encoder_lora": 5e-5}


@pytest.mark.parametrize("item, key, says", [
    ("stages.1.text_encoder_lr=5e-5", "stages.1.text_encoder_lr",
     "trains no text-encoder LoRA (stages.1.train_text_encoder = false by network_train_unet_only = true"),
    ("stages.1.pivot_lr=1e-2", "stages.1.pivot_lr", "does not train the pivot (a lora stage's train_pivot is false"),
    ("stages.0.unet_lr=1e-3", "stages.0.unet_lr", "stage 'inv' is an inversion stage"),
    ("stages.0.text_encoder_lr=1e-3", "stages.0.text_encoder_lr", "stage 'inv' is an inversion stage"),
    ("stages.0.train_unet=true", "stages.0.train_unet", "stage 'inv' is an inversion stage"),
    ("stages.0.train_text_encoder=true", "stages.0.train_text_encoder", "stage 'inv' is an inversion stage"),
])
def test_a_stage_key_for_a_group_the_stage_does_not_train_is_refused(tmp_path, item, key, says):
    with pytest.raises(ConfigError) as caught:
        load_config(_preset(tmp_path), {}, [item])
    assert caught.value.key == key and str(caught.value).startswith(f"--set {key} = ") and says in str(caught.value)


def test_a_lora_stages_own_switch_is_named_and_a_resolved_inversion_stages_false_switches_stay_accepted(tmp_path):
    path = _preset(tmp_path, STAGES + "train_unet = false\ntrain_text_encoder = true\nunet_lr = 1e-3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "stages.1.unet_lr"
    assert "(stages.1.train_unet = false): to train one at this rate, add --set stages.1.train_unet=true;" in str(caught.value)
    config = load_config(_preset(tmp_path), {}, ["stages.0.train_unet=false", "stages.0.train_text_encoder=false"])
    assert dict(config.stages[0].groups()) == {"pivot": 5e-3}


def _pivot_and_lora_decay(config) -> list[dict[str, float]]:
    """Each stage's optimizer groups' weight decay, as the built-in schedule plans them (one-number stand-in tensors)."""
    params = {"pivot": torch.nn.Parameter(torch.zeros(1)), "unet": torch.nn.Parameter(torch.zeros(1))}
    model = SimpleNamespace(pivot_parameters=lambda: [params["pivot"]], lora_parameters=lambda which: [params[which]])
    plans = [StagedSchedule(StagedSchedule.Options()).plan_stage(SimpleNamespace(model=model), with_length(s, s.steps)) for s in config.stages]
    return [{g["name"]: g["weight_decay"] for g in plan.optimizer.param_groups} for plan in plans]


def test_optimizer_args_weight_decay_reaches_the_pivot_and_the_default_pivot_decays_not(tmp_path):
    path = _preset(tmp_path)  # AdamW, the default optimizer
    default = load_config(path)
    assert _pivot_and_lora_decay(default) == [{"pivot": 0.0}, {"unet_lora": 0.01}]  # AdamW's 0.01 is not the pivot's
    assert training_metadata(default)["pti_inversion_pivot_weight_decay"] == "0.0"
    decayed = load_config(path, {}, ['stages.0.optimizer_args=["weight_decay=0.1"]'])
    assert _pivot_and_lora_decay(decayed) == [{"pivot": 0.1}, {"unet_lora": 0.01}]
    assert "optimizer_args=['weight_decay=0.1']" in decayed.stages[0].describe()
    assert decayed.stages[0].describe().endswith(" pivot_weight_decay=0.1")
    assert training_metadata(decayed)["pti_inversion_pivot_weight_decay"] == "0.1"
    own = load_config(path, {"pivot_weight_decay": 0.2},
                      ['stages.1.optimizer_args=["weight_decay=0.3"]'])  # the lora stage trains no pivot: no clash
    assert _pivot_and_lora_decay(own) == [{"pivot": 0.2}, {"unet_lora": 0.3}]


@pytest.mark.parametrize("flags, sets, where", [
    ({}, ['stages.0.optimizer_args=["weight_decay=0.1"]'], "stages.0.optimizer_args' weight_decay = 0.1"),
    ({"optimizer_args": ["weight_decay=0.1"]}, [], "optimizer_args' weight_decay = 0.1"),
])
def test_pivot_weight_decay_beside_an_optimizer_args_decay_is_refused_naming_both(tmp_path, flags, sets, where):
    with pytest.raises(ConfigError) as caught:
        load_config(_preset(tmp_path), {"pivot_weight_decay": 0.2} | flags, sets)
    assert caught.value.key == "pivot_weight_decay"
    assert str(caught.value).startswith(f"--pivot_weight_decay (command line) = 0.2 and {where} both set the pivot's "
                                        "decay in stage 0 'inv'")


def test_the_learning_rate_refusal_lists_the_lora_stage_first_and_kohyas_rates(tmp_path):
    path = _preset(tmp_path, STAGES + "train_text_encoder = true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"learning_rate": 1e-2})
    assert str(caught.value).endswith(
        "To change a stage, use --set stages.1.learning_rate=0.01 (lora stage 'lo') or --unet_lr 0.01 --text_encoder_lr "
        "0.01 in place of learning_rate (kohya's LoRA rates; the inversion keeps its own) or --set "
        "stages.0.learning_rate=0.01 (inversion stage 'inv').")
    config = load_config(path, {"unet_lr": 1e-2, "text_encoder_lr": 1e-2})  # the hint's kohya form
    assert dict(config.stages[1].groups()) == {"unet_lora": 1e-2, "text_encoder_lora": 1e-2}
    assert dict(config.stages[0].groups()) == {"pivot": 5e-3}
