"""Resume and save: the final state, files a resume would write again, another optimizer or stage, another cwd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import toml
import torch
from safetensors.torch import load_file

from pti_plugin.cli import main
from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer

from .conftest import make_preset
from .test_reliability import _cli


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


STAGES = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
          {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]


def test_save_state_writes_a_final_state_that_continues_like_a_longer_run(preset, tmp_path):
    """save_state alone (no intermediate saves): the final save (one inversion and one lora step) writes
    pti-state-step00000002, which records what its optimizer state belongs to; resumed with a longer last stage it
    ends bit for bit like a straight run."""
    stages = [STAGES[0] | {"steps": 1}, STAGES[1] | {"steps": 1}]
    first = preset(output_dir=str(tmp_path / "first"), save_state=True, save_precision="float", stages=stages)
    outputs = Trainer(build_config(first)).run()
    state = tmp_path / "first" / "pti-state-step00000002"
    assert outputs["state"] == state and state.is_dir()
    assert [p.name for p in (tmp_path / "first").glob("pti-state-*")] == [state.name]
    progress = json.loads((state / "progress.json").read_text())
    assert progress == {"stage_index": 1, "stage_step": 1, "global_step": 2, "stage_kind": "lora",
                        "optimizer_type": "AdamW", "param_groups": [{"name": "unet_lora", "tensors": 384}],
                        "token_string": "tok1", "base": {"model": Path(first["pretrained_model_name_or_path"]).name, "vae": None,
                                                           "base_weights": []},
                        "lora_scales": {"network_alpha": float(build_config(first).network_alpha), "conv_alpha": None},
                        "batch": {"processes": 1, "train_batch_size": 2, "gradient_accumulation_steps": 1}, "rules": 4}
    saved = load_file(state / "trainable.safetensors")
    assert torch.equal(saved["pivot.vectors"], load_file(tmp_path / "first" / "tok1.safetensors")["emb_params"])

    longer = [stages[0], stages[1] | {"steps": 2}]
    resumed = first | {"output_dir": str(tmp_path / "resumed"), "resume": str(state), "stages": longer}
    Trainer(build_config(resumed)).run()
    Trainer(build_config(first | {"output_dir": str(tmp_path / "straight"), "stages": longer})).run()
    assert _same(tmp_path / "resumed" / "pti.safetensors", tmp_path / "straight" / "pti.safetensors")
    assert _same(tmp_path / "resumed" / "tok1.safetensors", tmp_path / "straight" / "tok1.safetensors")
    assert (tmp_path / "resumed" / "pti-state-step00000003" / "progress.json").is_file()


KILLED = {"save_every_n_steps": 1, "save_state": True, "stages": [{"kind": "inversion", "steps": 3, "learning_rate": 5e-2}]}


@pytest.fixture(scope="module")
def killed_source(tiny_model, tiny_dataset, tmp_path_factory) -> Path:
    """The output folder of a 3-step run that saved (with states) at every step and whose final files are missing,
    as after a kill during the final save: trained once, copied by ``killed_run`` for each test."""
    out = tmp_path_factory.mktemp("killed") / "run"
    Trainer(build_config(make_preset(tiny_model, tiny_dataset, out, **KILLED))).run()
    for name in ("pti.safetensors", "tok1.safetensors"):
        (out / name).unlink()
    return out


@pytest.fixture
def killed_run(killed_source, preset, tmp_path):
    """A copy of ``killed_source`` in this test's folder; returns (its preset, its output folder)."""
    out = tmp_path / "run"
    shutil.copytree(killed_source, out)
    return preset(output_dir=str(out), **KILLED), out


def test_a_resume_whose_later_step_files_exist_is_refused_before_training(killed_run, tmp_path, capsys):
    raw, out = killed_run
    before = _files(out)
    code, seen = _cli(raw | {"resume": str(out / "pti-state-step00000001")}, tmp_path, capsys)
    assert code == 2, seen
    assert "Traceback" not in seen
    assert (f"key 'resume': output_dir {out} already holds pti-state-step00000002, pti-step00000002.safetensors, "
            "tok1-step00000002.safetensors, pti-state-step00000003") in seen
    assert "--overwrite" in seen and f"--resume {out / 'pti-state-step00000003'}" in seen
    assert _files(out) == before  # nothing trained, nothing written (the log included)


def test_a_trained_state_resumed_under_another_token_is_refused_before_training(killed_run, tmp_path, capsys):
    """The trainer records the token in each state it saves, so a resume with another token_string is refused at
    start naming both (before, the pivot trained for tok1 went on and was saved as tok2.safetensors)."""
    raw, out = killed_run
    state = out / "pti-state-step00000002"
    second = tmp_path / "second"
    code, seen = _cli(raw | {"output_dir": str(second), "resume": str(state), "token_string": "tok2"}, tmp_path, capsys)
    assert code == 2, seen
    message = next(line for line in seen.splitlines() if "key 'resume'" in line)
    assert "'tok1'" in message and "'tok2'" in message and "--token_string tok1" in message, message
    assert not (second / "tok2.safetensors").exists() and not (second / "pti.log.jsonl").exists()


def test_a_state_past_its_epoch_based_stage_is_refused_before_the_model_loads(killed_run, tiny_model, tmp_path, capsys):
    """An epoch-based stage's length is known once the data is scanned (8 samples at batch 8: 1 step an epoch), and a
    state past it (step 3) is refused then, before the model loads: with a base model whose UNet weights are cut
    short, the user reads the resume's refusal and the epochs that fit, not the model's error."""
    raw, out = killed_run
    model = tmp_path / "cut_model"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    stage = {"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "max_train_epochs": 1}
    run = raw | {"pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "elsewhere"),
                 "train_batch_size": 8, "stages": [stage]}
    code, seen = _cli(run, tmp_path, capsys)  # the cut model is refused as it loads
    assert code == 2 and "diffusion_pytorch_model.safetensors" in seen and "key 'resume'" not in seen, seen
    code, seen = _cli(run | {"resume": str(out / "pti-state-step00000003")}, tmp_path, capsys)
    assert code == 2, seen
    assert "key 'resume'" in seen and "step 3 of stage 0" in seen and "--set stages.0.max_train_epochs=3" in seen, seen
    assert "diffusion_pytorch_model" not in seen and "Traceback" not in seen, seen


def test_overwrite_lets_a_resume_and_a_new_run_replace_state_folders(killed_run, tmp_path, capsys):
    raw, out = killed_run
    code, seen = _cli(raw | {"resume": str(out / "pti-state-step00000001")}, tmp_path, capsys, ["--overwrite"])
    assert code == 0, seen
    assert json.loads((out / "pti-state-step00000002" / "progress.json").read_text())["global_step"] == 2
    assert (out / "pti-state-step00000003").is_dir() and (out / "pti.safetensors").is_file()
    code, seen = _cli(raw, tmp_path, capsys, ["--overwrite"])  # a new run over a folder holding states
    assert code == 0, seen
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary or old folder left


def _strip_progress(state: Path) -> None:
    """Make ``state`` look like a state folder from before the optimizer was recorded."""
    progress = json.loads((state / "progress.json").read_text())
    (state / "progress.json").write_text(json.dumps({k: progress[k] for k in ("stage_index", "stage_step", "global_step")}))


LORA_AFTER_ONE_STEP = {"save_every_n_steps": 3, "save_state": True, "stages": [STAGES[0], STAGES[1] | {"steps": 3}]}


@pytest.fixture(scope="module")
def lora_state(tiny_model, tiny_dataset, tmp_path_factory) -> Path:
    """The state after step 3 of a run of 2 inversion then 3 lora (AdamW) steps: stage 1 after one step."""
    out = tmp_path_factory.mktemp("lora_state") / "first"
    Trainer(build_config(make_preset(tiny_model, tiny_dataset, out, **LORA_AFTER_ONE_STEP))).run()
    return out / "pti-state-step00000003"


@pytest.mark.parametrize("old_state", [False, True], ids=["recorded", "old_state"])
@pytest.mark.parametrize("change", ["optimizer", "kind"])
def test_resuming_with_another_optimizer_or_stage_kind_is_refused_naming_resume(change, old_state, lora_state, preset,
                                                                                 tmp_path, capsys):
    raw = preset(output_dir=str(tmp_path / "first"), **LORA_AFTER_ONE_STEP)
    state = tmp_path / "first" / lora_state.name  # a copy: stage 1 (lora, AdamW) after one step
    shutil.copytree(lora_state, state)
    if old_state:
        _strip_progress(state)
    if change == "optimizer":
        stages = [STAGES[0], STAGES[1] | {"steps": 3, "optimizer_type": "SGD"}]
        expected = ["AdamW", "SGD"] if not old_state else ["SGD", "'betas'"]  # old: AdamW's options named
    else:
        stages = [STAGES[0], {"kind": "inversion", "steps": 3, "learning_rate": 5e-2}]
        expected = ["'lora'", "'inversion'"] if not old_state else ["[384] tensors", "pivot (1 tensors)"]
    out = tmp_path / "second"
    code, seen = _cli(raw | {"output_dir": str(out), "resume": str(state), "stages": stages}, tmp_path, capsys)
    assert code == 2, seen
    assert "Traceback" not in seen
    message = next(line for line in seen.splitlines() if "key 'resume'" in line)
    assert str(state) in message and all(word in message for word in expected), message
    assert not (out / "pti.log.jsonl").exists()  # refused before the first step


def test_run_config_holds_absolute_folders_and_a_resume_from_another_cwd_writes_there(preset, tmp_path, monkeypatch, capsys):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    raw = preset(output_dir="out", logging_dir="tb", save_every_n_steps=1, save_state=True,
                 stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}])
    code, seen = _cli(raw, tmp_path, capsys)
    assert code == 0, seen
    out = home / "out"
    resolved = toml.loads((out / "pti.config.toml").read_text())
    assert resolved["output_dir"] == str(out) and resolved["logging_dir"] == str(home / "tb")
    for name in ("pti.safetensors", "tok1.safetensors"):
        (out / name).unlink()
    for state in out.glob("pti-state-step00000002"):  # continue from step 1
        for child in state.iterdir():
            child.unlink()
        state.rmdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--preset", str(out / "pti.config.toml"), "--resume", str(out / "pti-state-step00000001")]) == 0
    assert (out / "pti.safetensors").is_file() and (out / "pti-state-step00000002").is_dir()
    assert list(elsewhere.iterdir()) == []


def test_a_resume_with_another_learning_rate_warns_that_the_saved_one_is_kept(killed_run, tmp_path, caplog):
    """torch restores a group's settings with its state: the new rate does nothing, so a warning names both."""
    import logging

    raw, out = killed_run
    stages = [{"kind": "inversion", "steps": 3, "learning_rate": 1e-3}]
    with caplog.at_level(logging.WARNING):
        Trainer(build_config(raw | {"output_dir": str(tmp_path / "again"), "resume": str(out / "pti-state-step00000003"),
                                    "stages": stages})).run()
    assert "keeps the saved optimizer settings of group pivot (torch restores them): initial_lr 0.05 (saved) instead of 0.001" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same settings: no warning
        Trainer(build_config(raw | {"output_dir": str(tmp_path / "same"), "resume": str(out / "pti-state-step00000003")})).run()
    assert "keeps the saved optimizer settings" not in caplog.text


def test_a_resume_with_other_lora_alphas_is_refused_and_an_old_locon_state_is_named(preset, tmp_path, capsys, caplog):
    """A LoRA's alphas are part of what it learned: a state records them and a resume with others is refused naming
    both. A state saved before they were recorded, with conv_dim and no conv_alpha, was trained with conv_alpha =
    conv_dim (the default then; kohya's 1.0 now): the resume says so and names the network_args item to add."""
    raw = preset(output_dir=str(tmp_path / "first"), save_every_n_steps=2, save_state=True, network_args=["conv_dim=4"],
                 stages=[STAGES[0] | {"steps": 1}, STAGES[1]])
    Trainer(build_config(raw)).run()
    state = tmp_path / "first" / "pti-state-step00000002"  # after the lora stage's first step
    assert json.loads((state / "progress.json").read_text())["lora_scales"]["conv_alpha"] == 1.0
    second = tmp_path / "second"
    code, seen = _cli(raw | {"output_dir": str(second), "resume": str(state), "network_args": ["conv_dim=4", "conv_alpha=4"]},
                      tmp_path, capsys)
    assert code == 2, seen
    assert "conv_alpha 1.0 then, 4.0 now" in seen and not (second / "pti.log.jsonl").exists()
    _strip_progress(state)  # as a state saved before the alphas were recorded
    with caplog.at_level("WARNING", logger="pti_plugin.resume"):
        Trainer(build_config(raw | {"output_dir": str(tmp_path / "third"), "resume": str(state)})).run()
    assert "add conv_alpha=4 to network_args" in caplog.text


def test_a_state_saved_before_any_lora_stage_resumes_with_other_alphas(killed_run, tmp_path):
    """The alphas scale the LoRA's trained weights; a state from the inversion stage has none yet, so a resume with
    another network_alpha is no reason to refuse it."""
    raw, out = killed_run
    state = out / "pti-state-step00000002"
    resumed = raw | {"output_dir": str(tmp_path / "second"), "resume": str(state), "network_alpha": 2.0}
    Trainer(build_config(resumed)).run()
    assert (tmp_path / "second" / "tok1.safetensors").is_file()
