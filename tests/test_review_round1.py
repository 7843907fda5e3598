"""Review of the kohya options of a35b6df: each test failed before its fix.

- save_last_n_*: a step save's LoRA name that is a link or a folder is not the run's file, so the pruning leaves it
  and its embedding (before, the embedding was deleted alone: "the embedding goes with its LoRA, never alone").
- weighted_captions: the held-out validation captions' weights are checked before training like the training
  captions' (before, a held-out caption with a weight that is no number ended the run with a traceback at its
  first validation, after the model loaded and a step trained).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.scanning import scan_images_and_held_out
from pti_plugin.outputs import RunFiles
from pti_plugin.save_schedule import prune_saves
from pti_plugin.trainer import Trainer

from .conftest import draw_character


def test_a_lora_name_that_is_a_link_or_a_folder_keeps_its_embedding(tmp_path):
    # save_last_n_steps = 1, a save every step: the save at step 5 prunes the step saves 1..3. Step 1's LoRA name is a
    # link to a file kept elsewhere, step 2's a folder: neither is a file the run wrote, so both stay with their
    # embeddings; step 3 is an ordinary save and goes, LoRA and embedding.
    config = SimpleNamespace(save_every_n_steps=1, save_every_n_epochs=0, save_n_epoch_ratio=None, save_state=False,
                             save_last_n_steps=1, save_last_n_epochs=None, save_last_n_steps_state=None,
                             save_last_n_epochs_state=None, stages=[SimpleNamespace(steps=10)])
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.safetensors").write_bytes(b"lora")
    (tmp_path / "pti-step00000001.safetensors").symlink_to(kept / "mine.safetensors")
    (tmp_path / "pti-step00000002.safetensors").mkdir()
    (tmp_path / "pti-step00000003.safetensors").write_bytes(b"lora")
    for step in (1, 2, 3):
        (tmp_path / f"tok1-step{step:08d}.safetensors").write_bytes(b"embedding")
    removed = prune_saves(RunFiles(tmp_path, "pti", "tok1"), config, 5, 1)
    assert sorted(p.name for p in removed) == ["pti-step00000003.safetensors", "tok1-step00000003.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept", "pti-step00000001.safetensors", "pti-step00000002.safetensors", "tok1-step00000001.safetensors",
        "tok1-step00000002.safetensors"]
    assert (tmp_path / "tok1-step00000001.safetensors").read_bytes() == b"embedding"
    assert (kept / "mine.safetensors").read_bytes() == b"lora"


def test_a_held_out_captions_bad_weight_is_refused_before_training(preset, tmp_path):
    data = tmp_path / "data" / "1_tok1"
    data.mkdir(parents=True)
    for i in range(4):
        draw_character(data / f"{i}.png", 3 * i)
        (data / f"{i}.txt").write_text("an anime illustration of tok1")
    raw = preset(train_data_dir=str(tmp_path / "data"), weighted_captions=True, validation_split=0.25,
                 validate_every_n_steps=1, stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}])
    config = build_config(raw)
    train, held_out = scan_images_and_held_out(config, load_subsets(config), log_notes=False)
    assert len(train) == 3 and len(held_out) == 1
    bad = held_out[0].path.with_suffix(".txt")
    bad.write_text("a (red:1.2.3) illustration of tok1")  # only the held-out image has it
    with pytest.raises(ConfigError, match=r"key 'weighted_captions': the caption of .*" + held_out[0].path.name):
        Trainer(build_config(raw)).run()
    assert not (tmp_path / "out" / "pti.safetensors").exists()
