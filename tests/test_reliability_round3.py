"""Reliability, third round: the dataset preview without a model, a resume under another token, save and sample
intervals longer than the run, the sample size cap, and one text encoding per distinct sample text."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import toml
import torch

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.dataset_preview import main as preview_main
from pti_plugin.resolution import with_epoch_steps
from pti_plugin.resume import save_state

from .conftest import draw_character


def _data(root: Path) -> Path:
    folder = root / "data" / "2_tok1"
    folder.mkdir(parents=True)
    for i, caption in enumerate(["tok1, red hair", "tok1, smile"]):
        draw_character(folder / f"{i}.png", 3 * i)
        (folder / f"{i}.txt").write_text(caption)
    return folder.parent


def _raw(tmp_path: Path, **extra) -> dict:
    return {"train_data_dir": str(_data(tmp_path)), "output_dir": str(tmp_path / "out"), "resolution": 32} | extra


# ----------------------------------------------------------------------------- 1. the preview needs no model

def test_the_dataset_preview_runs_without_the_model_it_never_loads(tmp_path, capsys):
    """The preview loads no model and its captions need no tokenizer: a preset naming a model (or starting files,
    or an output folder) that is not on this machine previews its data; training refuses the same preset."""
    raw = _raw(tmp_path, pretrained_model_name_or_path=str(tmp_path / "models" / "sd15"),
               weights=str(tmp_path / "tok1.safetensors"), sample_prompts=str(tmp_path / "prompts.txt"))
    preset = tmp_path / "preset.toml"
    preset.write_text(toml.dumps(raw))
    assert preview_main(["--preset", str(preset), "--n", "2"]) == 0
    assert "tok1, red hair" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path.*path not found"):
        build_config(raw)
    # the data it does read is still checked, naming the key
    assert preview_main(["--preset", str(preset), "--train_data_dir", str(tmp_path / "nowhere")]) == 2
    assert "train_data_dir" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2. resume under another token

def _state(folder: Path, **recorded) -> Path:
    pivot = torch.zeros(1, 8)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0], "name": "pivot"}]}
    return save_state(folder, {"pivot.vectors": pivot}, optimizer, {"last_epoch": 1}, 0, 1, 1, stage_kind="inversion",
                      optimizer_type="AdamW", param_groups=[("pivot", 1)], **recorded)


def test_a_resume_of_a_state_saved_for_another_token_is_refused_naming_both_tokens(tmp_path):
    state = _state(tmp_path / "pti-state-step00000001", token_string="tokA")
    assert json.loads((state / "progress.json").read_text())["token_string"] == "tokA"
    with pytest.raises(ConfigError, match=r"key 'resume': state .*pti-state-step00000001 holds the pivot of token_string "
                                          r"'tokA'; this run's token_string is 'tokB' .*resume with --token_string tokA"):
        build_config(_raw(tmp_path, resume=str(state), token_string="tokB"))
    build_config(_raw(tmp_path / "same", resume=str(state), token_string="tokA"))  # the saved token resumes


def test_a_state_that_does_not_record_its_token_resumes_under_any_token(tmp_path):
    state = _state(tmp_path / "pti-state-step00000001")  # written before the token was recorded
    assert "token_string" not in json.loads((state / "progress.json").read_text())
    build_config(_raw(tmp_path, resume=str(state), token_string="tokB"))


# ----------------------------------------------------------------------------- 3. intervals longer than the run

def _interval_warnings(caplog) -> list[str]:
    found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "in between" in r.getMessage()]
    caplog.clear()
    return found


def test_save_and_sample_intervals_longer_than_a_step_based_run_are_warned_once_at_start(tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1\n")
    caplog.set_level(logging.WARNING)
    config = build_config(_raw(tmp_path, max_train_steps=10, save_every_n_steps=50, sample_every_n_steps=30,
                               save_every_n_epochs=2, sample_prompts=str(prompts)))  # two built-in stages: 20 steps
    assert sorted(_interval_warnings(caplog)) == [
        "sample_every_n_steps = 30 is more than the run's 20 step(s): no sample is drawn during training; lower it to "
        "sample in between",
        "save_every_n_steps = 50 is more than the run's 20 step(s): nothing is saved before the final save; lower it to "
        "save in between"]
    with_epoch_steps(config, 4)  # 10 steps = 2 full epochs a stage: save_every_n_epochs = 2 saves
    assert _interval_warnings(caplog) == []
    with_epoch_steps(config, 6)  # 1 epoch a stage
    assert _interval_warnings(caplog) == [
        "save_every_n_epochs = 2 is more than the 1 epoch(s) of the longest stage (epochs are counted within each "
        "stage, 6 step(s) each): nothing is saved before the final save; lower it to save in between"]
    with_epoch_steps(config, 12)  # 10 steps of 12: no stage ends its first epoch, lowering the value cannot help
    assert _interval_warnings(caplog) == [
        "save_every_n_epochs = 2: every stage ends before its first epoch ends (12 step(s) each): no epoch save, "
        "nothing is saved before the final save; save_every_n_steps saves in between"]
    build_config(_raw(tmp_path / "fits", max_train_steps=10, save_every_n_steps=15, sample_every_n_steps=20,
                      sample_prompts=str(prompts)))
    assert _interval_warnings(caplog) == []


def test_a_step_interval_longer_than_an_epoch_based_run_is_warned_after_the_scan(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    config = build_config(_raw(tmp_path, max_train_epochs=2, save_every_n_steps=50, save_every_n_epochs=3))
    assert [m.partition(" is")[0] for m in _interval_warnings(caplog)] == ["save_every_n_epochs = 3"]  # known: 2 epochs
    with_epoch_steps(config, 3)  # 2 stages x 2 epochs x 3 steps
    assert _interval_warnings(caplog) == [
        "save_every_n_steps = 50 is more than the run's 12 step(s): nothing is saved before the final save; lower it to "
        "save in between"]


def test_sample_every_n_epochs_longer_than_every_stage_is_warned_after_the_scan(tmp_path, caplog):
    """kohya's sample_every_n_epochs (which replaces sample_every_n_steps) samples at the end of a stage's every N-th
    epoch, its last partial one included: 10 steps of 4 are 3 epochs (the third partial), so 3 samples in between and
    4 never does."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1\n")
    caplog.set_level(logging.WARNING)
    config = build_config(_raw(tmp_path, max_train_steps=10, sample_every_n_epochs=4, sample_every_n_steps=100,
                               sample_prompts=str(prompts)))  # two built-in stages of 10 steps
    assert _interval_warnings(caplog) == []  # epochs unknown before the scan; the replaced step key is not measured
    with_epoch_steps(config, 4)
    assert _interval_warnings(caplog) == [
        "sample_every_n_epochs = 4 is more than the 3 epoch(s) of the longest stage (epochs are counted within each "
        "stage, its last one partial or not): no sample is drawn during training; lower it to sample in between"]
    fits = build_config(_raw(tmp_path / "fits", max_train_steps=10, sample_every_n_epochs=3, sample_prompts=str(prompts)))
    with_epoch_steps(fits, 4)
    assert _interval_warnings(caplog) == []


# ----------------------------------------------------------------------------- 4. sample size cap

CAP = 4096  # input_checks.MAX_SAMPLE_SIZE, the cap the README states


@pytest.mark.parametrize("line, flag, value", [("tok1 --w 100000", "--w", 100000),
                                               (f"tok1 --w 512 --h {CAP + 8}", "--h", CAP + 8)])
def test_a_sample_size_over_the_cap_is_refused_at_start_naming_the_file_line_and_flag(tmp_path, line, flag, value):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"tok1 --w {CAP} --h {CAP}\n{line}\n")  # the cap itself samples
    with pytest.raises(ConfigError, match=rf"key 'sample_prompts': {prompts} line 2: {flag} must be at most "
                                          rf"{CAP} px .*got {value}"):
        build_config(_raw(tmp_path, sample_prompts=str(prompts)))


# ----------------------------------------------------------------------------- 5. one encoding per distinct text

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_samples_encode_each_distinct_negative_prompt_once_and_draw_the_same_images(tiny_model, tmp_path):
    """A prompt file repeating one negative prompt used to encode it once per prompt. Now each distinct text is
    encoded once per sampling call; every image equals the one its prompt gives alone, bit for bit."""
    from pti_plugin.models.loading import load_base_model
    from pti_plugin.sampling import generate_samples, parse_prompt_line, sample_scheduler

    base = load_base_model(str(tiny_model))
    pipe = base.pipeline(sample_scheduler("ddim", base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    calls: list[str] = []

    def encode(texts: list[str]):
        calls.extend(texts)
        return base.encode(base.tokenize(texts))

    lines = ["a red square --n blurry --d 1", "a blue square --n blurry --d 2", "a red square --n ugly --d 3",
             "a green square --d 4", "a red square --n blurry --d 5"]
    prompts = [parse_prompt_line(line) for line in lines]
    together = [tmp_path / f"together-{i}.png" for i in range(len(lines))]
    generate_samples(pipe, prompts, (32, 32), 2, together, encode=encode)
    assert sorted(calls) == sorted({"a red square", "a blue square", "a green square", "blurry", "ugly", ""})
    for i, prompt in enumerate(prompts):
        alone = tmp_path / f"alone-{i}.png"
        generate_samples(pipe, [prompt], (32, 32), 2, [alone], encode=encode)
        assert np.array_equal(np.asarray(_png(alone)), np.asarray(_png(together[i])))


def _png(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")
