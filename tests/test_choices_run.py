"""Every value a choice-valued key accepts runs: a 1-step job per value (tiny model).

The jobs take the values round-robin (job j uses value j mod n of every key), so each accepted value
of every key runs at least once in as many jobs as the longest list (the optimizers). A value that
needs a package or a GPU this machine lacks must be refused at validation by name instead; that is checked
without running. The value lists are the ones validation accepts, so a newly accepted value is swept.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
from safetensors import safe_open

from pti_plugin.choices import CHOICES, cuda_available, installed
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.lr_schedulers import SUPPORTED_SCHEDULERS
from pti_plugin.optimizers import SUPPORTED, optimizer_package
from pti_plugin.trainer import Trainer

SWEPT = {"optimizer_type": tuple(SUPPORTED), "lr_scheduler": SUPPORTED_SCHEDULERS} | CHOICES


def _runnable(key, value) -> bool:
    if (key, value) == ("mixed_precision", "fp16") and not cuda_available():
        return False
    package = optimizer_package(value) if key == "optimizer_type" else None
    if key == "log_with" and value == "tensorboard":
        package = ("tensorboard", "tensorboard")
    return package is None or installed(package[0])


RUNNABLE = {key: [v for v in values if _runnable(key, v)] for key, values in SWEPT.items()}
JOBS = max(len(values) for values in RUNNABLE.values())


#: The settings a scheduler cannot run without, given beside it in its job's stage.
NEEDS = {"cosine_with_min_lr": {"lr_scheduler_min_lr_ratio": 0.1}, "warmup_stable_decay": {"lr_decay_steps": 1},
         "piecewise_constant": {"lr_scheduler_args": ["step_rules='1:1,0.5'"]}}
#: Keys whose values are taken with an offset, so that a value meets other partners (model_family "sdxl" meets
#: max_token_length 75; SDXL's 150/225 windows are tested in test_sdxl_kohya_r4.py).
OFFSETS = {"model_family": 2}


def _job(j: int) -> dict:
    return {key: values[(j + OFFSETS.get(key, 0)) % len(values)] for key, values in RUNNABLE.items()}


def test_every_accepted_value_is_in_some_job():
    covered = {key: {_job(j)[key] for j in range(JOBS)} for key in RUNNABLE}
    assert covered == {key: set(values) for key, values in RUNNABLE.items()}


@pytest.mark.parametrize("j", range(JOBS), ids=lambda j: "-".join(str(v) for v in _job(j).values()))
def test_a_one_step_job_runs_with_each_accepted_value(preset, tmp_path, j, tiny_sdxl):
    choices = _job(j)
    if choices["model_family"] == "sdxl":
        choices["pretrained_model_name_or_path"] = str(tiny_sdxl)
    stage = {k: choices.pop(k) for k in ("optimizer_type", "lr_scheduler")}
    stage |= NEEDS.get(stage["lr_scheduler"], {})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --s 1\n")
    raw = preset(**choices, train_batch_size=1, sample_prompts=str(prompts) if j < 2 else "", sample_steps=1,
                 stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-3, "train_pivot": True, **stage}])
    Trainer(build_config(raw)).run()
    with safe_open(str(tmp_path / "out" / "pti.safetensors"), "pt") as handle:
        meta = handle.metadata()
        assert all(math.isfinite(float(handle.get_tensor(k).float().abs().max())) for k in handle.keys())
    assert meta["ss_lr_scheduler"] == stage["lr_scheduler"] and meta["ss_optimizer"] == stage["optimizer_type"]


@pytest.mark.parametrize("key, value", [(k, v) for k, values in SWEPT.items() for v in values if not _runnable(k, v)])
def test_a_value_whose_package_is_missing_is_refused_by_name(tmp_path, key, value):
    raw = {"train_data_dir": str(tmp_path), key: value}
    with pytest.raises(ConfigError, match="needs the .* package|needs a CUDA GPU"):
        build_config(raw)


def test_the_package_check_is_real(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'Adafactor' needs the transformers package \(pip install transformers\)"):
        build_config({"train_data_dir": str(tmp_path), "optimizer_type": "Adafactor"})
