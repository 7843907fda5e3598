"""Small differences from kohya found in the last round: sample sizes kohya rounds, kohya's per-family
bucket_reso_steps rule, the sweeps' bad inputs as usage errors (exit 2), the analysis of an SDXL run trained at
max_token_length 225, and the latent-cache temporaries a killed run leaves in the dataset folder."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import toml
import torch
from PIL import Image

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer

from .test_analysis_inputs import _refused

# ----------------------------------------------------------------------------- 1. sample sizes kohya rounds


def test_a_sample_size_off_the_8_grid_is_warned_about_naming_the_prompt_not_refused(tmp_path, caplog):
    """kohya's sample_image_inference: max(64, v - v % 8). Before: refused ('a positive multiple of 8')."""
    from pti_plugin.input_checks import check_sample_prompts

    lines = tmp_path / "prompts.txt"
    lines.write_text("tok1 smiling --w 100 --h 30\ntok1 --w 64 --h 512\ntok1 tiny --w 0 --h 4100\n")
    with caplog.at_level(logging.WARNING):
        check_sample_prompts(lines)
    text = caplog.text
    assert f"{lines} line 1 ('tok1 smiling'): --w 100 is sampled at 96 px" in text
    assert f"{lines} line 1 ('tok1 smiling'): --h 30 is sampled at 64 px" in text
    assert "line 2" not in text  # 64 x 512 is sampled as given
    assert "line 3 ('tok1 tiny'): --w 0 is sampled at 64 px" in text
    assert "line 3 ('tok1 tiny'): --h 4100 is sampled at 4096 px" in text
    table = tmp_path / "prompts.toml"
    table.write_text('[prompt]\nwidth = 30\n[[prompt.subset]]\nprompt = "tok1 a"\nheight = 77\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_sample_prompts(table)
    assert "prompt 1 ('tok1 a'): width 30 is sampled at 64 px" in caplog.text
    assert "prompt 1 ('tok1 a'): height 77 is sampled at 72 px" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("tok1 --h -8\n", "line 1: --h must not be negative, got -8"),
    ("tok1 --w 4104\n", "line 1: --w must be at most 4096 px"),
])
def test_a_negative_or_too_large_sample_size_is_still_refused(tmp_path, text, message):
    from pti_plugin.input_checks import check_sample_prompts

    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        check_sample_prompts(path)


class _Pipe:
    """Records the size of each call; returns a blank image of that size."""

    scheduler = None

    def __init__(self):
        self.sizes = []

    def __call__(self, width, height, **kwargs):
        self.sizes.append((width, height))
        return type("Out", (), {"images": [Image.new("RGB", (width, height))]})()


def test_generate_samples_passes_kohyas_rounded_sizes_to_the_pipeline(tmp_path):
    from pti_plugin.sampling import SamplePrompt, generate_samples

    prompts = [SamplePrompt("a", width=100, height=30), SamplePrompt("b", width=0, height=72),
               SamplePrompt("c"), SamplePrompt("d", width=64, height=4100)]
    pipe = _Pipe()
    generate_samples(pipe, prompts, (48, 40), 1, [tmp_path / f"{i}.png" for i in range(4)])
    # by hand: 100 -> 96, 30 -> 64 (the minimum), 0 -> 64, 72 kept, no size -> the default, 4100 -> 4096
    assert pipe.sizes == [(96, 64), (64, 72), (48, 40), (64, 4096)]


def test_a_run_samples_a_prompt_of_36_x_72_at_64_x_72(preset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --w 36 --h 72 --d 1\n")
    outputs = Trainer(build_config(preset(sample_prompts=str(prompts), sample_steps=1,
                                          stages=[{"kind": "inversion", "steps": 1}]))).run()
    assert [Image.open(p).size for p in outputs["samples"]] == [(64, 72)]


# ----------------------------------------------------------------------------- 2. bucket_reso_steps per family


def _subsets(raw: dict):
    from pti_plugin.data.dataset import load_subsets

    config = build_config(raw)
    return config, load_subsets(config)


@pytest.mark.parametrize("family, step, divisor", [("sdxl", 48, 32), ("sdxl", 16, 32), ("sd15", 32, 64),
                                                   ("sd15", 96, 64)])
def test_a_bucket_step_the_family_does_not_take_is_refused_naming_the_key(family, step, divisor, preset, tiny_sdxl):
    """kohya: train_network.py verify_bucket_reso_steps(64), sdxl_train_network.py verify_bucket_reso_steps(32)."""
    from pti_plugin.family_checks import check_bucket_steps

    model = {"sdxl": {"pretrained_model_name_or_path": str(tiny_sdxl)}, "sd15": {}}[family]
    config, subsets = _subsets(preset(**model, resolution=192, enable_bucket=True, bucket_reso_steps=step,
                                      min_bucket_reso=192, max_bucket_reso=384))
    with pytest.raises(ConfigError, match=f"key 'bucket_reso_steps' = {step} is not a multiple of {divisor}: kohya's"):
        check_bucket_steps(config, subsets)


@pytest.mark.parametrize("family, step, buckets", [("sdxl", 32, True), ("sdxl", 96, True), ("sd15", 64, True),
                                                   ("sd15", 128, True), ("sdxl", 48, False), ("sd15", 8, False)])
def test_a_bucket_step_the_family_takes_or_an_unused_one_passes(family, step, buckets, preset, tiny_sdxl):
    from pti_plugin.family_checks import check_bucket_steps

    model = {"sdxl": {"pretrained_model_name_or_path": str(tiny_sdxl)}, "sd15": {}}[family]
    config, subsets = _subsets(preset(**model, resolution=384, enable_bucket=buckets, bucket_reso_steps=step,
                                      min_bucket_reso=384, max_bucket_reso=768))
    check_bucket_steps(config, subsets)


def test_the_dataset_of_a_dataset_config_is_named_and_nothing_loads(preset, tiny_sdxl, tiny_dataset, tmp_path, monkeypatch):
    config_file = tmp_path / "datasets.toml"
    config_file.write_text(toml.dumps({"general": {"enable_bucket": True, "resolution": 192, "min_bucket_reso": 96,
                                                   "max_bucket_reso": 384},
                                       "datasets": [{"bucket_reso_steps": 32, "subsets": [{"image_dir": str(tiny_dataset / "2_tok1")}]},
                                                    {"bucket_reso_steps": 48, "subsets": [{"image_dir": str(tiny_dataset / "2_tok1")}]}]}))
    monkeypatch.setattr("pti_plugin.trainer.load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    raw = preset(pretrained_model_name_or_path=str(tiny_sdxl), train_data_dir="", dataset_config=str(config_file))
    with pytest.raises(ConfigError, match=rf"dataset_config {config_file} datasets.1: bucket_reso_steps = 48 is not a "
                                          r"multiple of 32: kohya's sdxl_train_network.py refuses it"):
        Trainer(build_config(raw)).run()


# ----------------------------------------------------------------------------- 3. the sweeps' bad inputs: exit 2


@pytest.fixture
def sweep_preset(tiny_model, tiny_dataset, tmp_path):
    def write(**overrides) -> str:
        path = tmp_path / f"p{len(list(tmp_path.glob('p*.toml')))}.toml"
        path.write_text(toml.dumps({"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset),
                                    "resolution": 32, "output_dir": str(tmp_path / "unused"),
                                    "stages": [{"kind": "inversion", "learning_rate": 5e-2}]} | overrides))
        return str(path)
    return write


@pytest.mark.parametrize("case", ["refused preset", "no such stage", "seed past the count", "address without ray"])
def test_a_bad_input_of_the_lr_sweep_is_one_error_line_and_exit_2(case, sweep_preset, tmp_path, capsys):
    """Before: SystemExit('error: ...'), exit 1, the status of a failed run."""
    from pti_plugin.sweeps import lr_sweep

    base = ["--stage", "inversion", "--lrs", "1e-2", "--steps", "1", "--gpus", "none", "--out", str(tmp_path / "o")]
    argv, expected = {
        "refused preset": (["--preset", sweep_preset(lerning_rate=1.0)], "error: preset: unknown key 'lerning_rate'"),
        "no such stage": (["--preset", sweep_preset(), "--stage", "lora"], "error: the preset has no 'lora' stage"),
        "seed past the count": (["--preset", sweep_preset(), "--training_seeds", "2", "--only_training_seed", "2"],
                                "error: --only_training_seed 2: not among the 2 training seeds"),
        "address without ray": (["--preset", sweep_preset(), "--address", "auto"],
                                "error: --address and --gpus_per_run apply to --engine ray only"),
    }[case]
    err = _refused(lambda: lr_sweep.cli(base + argv), capsys)
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "o" / "runs").exists()


def test_a_bad_input_of_the_bench_is_exit_2(tmp_path, capsys):
    from pti_plugin.sweeps import bench

    bad = tmp_path / "bad.toml"
    bad.write_text("network_dim = 0\n")
    err = _refused(lambda: bench.main(["--preset", str(bad), "--out", str(tmp_path / "b")]), capsys)
    assert "error: preset: key 'network_dim' must be > 0" in err
    err = _refused(lambda: bench.parse_args(["--variants", "bogus", "--out", str(tmp_path / "b")]), capsys)
    assert "argument --variants: unknown ['bogus']" in err


# ----------------------------------------------------------------------------- 4. an SDXL run at max_token_length 225


def test_the_analysis_of_an_sdxl_run_trained_at_225_tokens_finds_a_subject_past_77(preset, tiny_sdxl, tmp_path):
    """Ids and per-token states are 227 long (max_token_length + 2) and a row's position is its token's: the states of
    a prompt with the pivot at position p and of the same prompt with the class word there agree before p (CLIP's
    causal attention) and differ at p."""
    from pti_plugin.metrics.localisation import generate_with_heatmaps
    from pti_plugin.metrics.prompts import subject_positions, subject_token_ids
    from pti_plugin.metrics.run_model import load_run

    Trainer(build_config(preset(pretrained_model_name_or_path=str(tiny_sdxl), max_token_length=225,
                                stages=[{"kind": "inversion", "steps": 1}, {"kind": "lora", "steps": 1}]))).run()
    run = load_run(tmp_path / "out", device="cpu")
    filler = "a " * 90
    tuned, base = [run.prompt(filler + "{} on a table", t) for t in (True, False)]
    assert tuple(run.tokenize([tuned]).shape) == (1, 2, 227)
    ids = run.token_positions_ids([tuned, base])
    assert tuple(ids.shape) == (2, 227)
    p = subject_positions(ids[0], subject_token_ids(run.tokenizer, run.pivot_text))[0]
    assert p > 77 and subject_positions(ids[1], subject_token_ids(run.tokenizer, run.subject(False)))[0] == p
    states = run.encode([tuned, base])
    assert tuple(states.shape[:2]) == (2, 227)
    differs = [(states[0, i] - states[1, i]).abs().max().item() > 0 for i in range(227)]
    assert differs.index(True) == p
    images, heatmaps = generate_with_heatmaps(run, filler + "{} on a table", True, [0], steps=1)
    assert len(images) == 1 and torch.isfinite(torch.as_tensor(heatmaps)).all() and torch.as_tensor(heatmaps).sum() > 0


# ----------------------------------------------------------------------------- 5. latent-cache temporaries


def test_a_killed_cachings_temporaries_are_removed_when_old_and_nothing_else(preset, tiny_dataset, tmp_path, caplog):
    """Before: a SIGKILL during cache_latents_to_disk left them in the user's folder for ever."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    folder = data / "2_tok1"
    stale = folder / ".a.32x32.0123456789ab.pti_latents.safetensors.k3j9x_ab.tmp"
    stale_flip = folder / ".a.32x32.flip.0123456789ab.pti_latents.safetensors.zz00zz00.tmp"
    fresh = folder / ".a.32x32.0123456789ab.pti_latents.safetensors.fresh123.tmp"  # maybe another run's, writing now
    users = [folder / ".a.png.k3j9x_ab.tmp", folder / "a.32x32.0123456789ab.pti_latents.safetensors.k3j9x_ab.tmp",
             folder / ".mine.tmp", folder / ".a.32x32.0123456789ab.pti_latents.safetensors.k3j9x_ab.tmp.bak",
             folder / ".a.32x32.0123456789ab.pti_latents.safetensors.toolongname.tmp"]
    folder_like = folder / ".b.32x32.0123456789ab.pti_latents.safetensors.abcdefgh.tmp"
    folder_like.mkdir()
    hour_ago = time.time() - 3600
    for path in [stale, stale_flip, fresh, *users]:
        path.write_bytes(b"partial")
        if path is not fresh:
            os.utime(path, (hour_ago, hour_ago))
    os.utime(folder_like, (hour_ago, hour_ago))
    before = {p.name for p in folder.iterdir()}
    with caplog.at_level(logging.WARNING):
        Trainer(build_config(preset(train_data_dir=str(data), cache_latents_to_disk=True,
                                    stages=[{"kind": "inversion", "steps": 1}]))).run()
    after = {p.name for p in folder.iterdir()}
    assert before - after == {stale.name, stale_flip.name}
    assert all(p.read_bytes() == b"partial" for p in [fresh, *users]) and folder_like.is_dir()
    assert f"removed {stale}, an incomplete latent-cache file" in caplog.text and str(stale_flip) in caplog.text
    assert any(name.endswith(".pti_latents.safetensors") and not name.startswith(".") for name in after - before)
