"""Small consistency fixes: a ``--set`` item read one way (its path stripped) by the override and by the error that
names it; a missing model folder in the one "not found" form; ``dim_from_weights`` from the tensors the start-up check
read (the file read once); a sweep's planning, which trains nothing, keeps no starting file's tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors
import toml
import torch
from safetensors.torch import save_file

from pti_plugin import checked_files
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import _set_paths, apply_overrides, build_config, load_config
from pti_plugin.models.model_checks import model_folder_problem
from pti_plugin.script_args import sd15_folder_problem
from pti_plugin.sweeps import lr_sweep, plan

from .conftest import make_preset

_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{}"


def _lora_file(path: Path) -> Path:
    """A kohya LoRA file of rank 2, alpha 1.0 on two modules (written out here, not by the code under test)."""
    tensors = {}
    for proj in ("q", "k"):
        tensors |= {f"{_MODULE.format(proj)}.lora_down.weight": torch.full((2, 32), 0.5),
                    f"{_MODULE.format(proj)}.lora_up.weight": torch.zeros(32, 2),
                    f"{_MODULE.format(proj)}.alpha": torch.tensor(1.0)}
    save_file(tensors, str(path))
    return path


@pytest.fixture(autouse=True)
def _nothing_kept():
    checked_files.release()
    yield
    checked_files.release()


# ----------------------------------------------------------------------------- --set: one reading of an item

def test_a_set_item_with_spaces_around_its_path_sets_that_path_in_both_readings():
    raw = {"network_dim": 4, "stages": [{"kind": "lora", "steps": 1, "learning_rate": 0.01}]}
    sets = [" network_dim = 8", "stages.0.learning_rate =0.5 "]
    out = apply_overrides(raw, {}, sets)
    assert out == {"network_dim": 8, "stages": [{"kind": "lora", "steps": 1, "learning_rate": 0.5}]}
    assert _set_paths(sets) == ["network_dim", "stages.0.learning_rate"]


def test_a_bad_set_item_with_spaces_is_named_as_the_set_not_the_preset(tiny_model, tiny_dataset, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(toml.dumps(make_preset(tiny_model, tiny_dataset, tmp_path / "out")))
    with pytest.raises(ConfigError) as caught:
        load_config(preset, sets=[" stages.0.learning_rate = -1"])
    assert str(caught.value).startswith("--set stages.0.learning_rate must be > 0")


# ----------------------------------------------------------------------------- a missing model folder

def test_a_missing_model_folder_is_named_in_the_one_not_found_form(tmp_path, monkeypatch):
    expected = f"base model not found: looked for {tmp_path / 'gone'} (a diffusers folder with model_index.json)"
    assert model_folder_problem(tmp_path / "gone") == expected
    assert sd15_folder_problem(tmp_path / "gone") == expected  # the scripts' --model: "--model <path>: " + this
    monkeypatch.chdir(tmp_path)  # a relative path: where it was looked for, absolute
    assert model_folder_problem(Path("gone")) == expected


# ----------------------------------------------------------------------------- the starting files, read once

def test_dim_from_weights_takes_the_dims_from_the_checked_tensors_reading_the_file_once(tiny_model, tiny_dataset,
                                                                                         tmp_path, monkeypatch):
    weights = _lora_file(tmp_path / "start.safetensors")
    opened, open_file = [], safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open",
                        lambda path, *a, **k: opened.append(Path(path)) or open_file(path, *a, **k))
    config = build_config(make_preset(tiny_model, tiny_dataset, tmp_path / "out", network_weights=str(weights),
                                      dim_from_weights=True, network_dim=8, network_alpha=8.0))
    assert (config.network_dim, config.network_alpha) == (2, 1.0)
    assert opened == [weights]
    # the trainer takes the same tensors, once: a second take reads the file
    tensors = checked_files.take(str(weights), lambda path: pytest.fail("read again"))
    assert set(tensors) == {f"{_MODULE.format(p)}.{suffix}" for p in "qk"
                            for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert torch.equal(tensors[f"{_MODULE.format('q')}.lora_down.weight"], torch.full((2, 32), 0.5))
    assert checked_files.take(str(weights), lambda path: "read") == "read"


def test_a_sweeps_planning_keeps_no_starting_files_tensors(tiny_model, tiny_dataset, tmp_path):
    weights = _lora_file(tmp_path / "start.safetensors")
    raw = make_preset(tiny_model, tiny_dataset, tmp_path / "unused", network_weights=str(weights), network_dim=2,
                      network_alpha=1.0, stages=[{"name": "lora", "kind": "lora", "learning_rate": 1e-2}])
    args = lr_sweep.parse_args(["--preset", "p", "--stage", "lora", "--lrs", "1e-3,1e-2", "--steps", "2",
                                "--out", str(tmp_path / "s")])
    pivots, specs = plan.plan_sweep(args, raw)
    assert [s.name for s in specs] == ["lora-lr0.001", "lora-lr0.01"] and not pivots
    assert checked_files._KEPT == {}
    # a run's own check (the training process) keeps them for its trainer
    build_config(toml.load(specs[0].preset_path))
    assert checked_files.take(str(weights), lambda path: pytest.fail("read again")) is not None
