"""kohya's ``ss_num_validation_images`` (train_network.py: ``val_dataset_group.num_train_images``, 0 without
validation, written as ``str``): the images ``validation_split`` holds out, each counted once (kohya's validation
dataset takes ``num_repeats = 1``)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def test_the_lora_records_how_many_images_validation_holds_out(preset, tmp_path):
    stages = [{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]
    # tiny_dataset: 2_tok1 with 4 images (2 repeats); kohya holds out round(4 x 0.5) = 2 images, counted without repeats
    Trainer(build_config(preset(output_dir=str(tmp_path / "a"), stages=stages, validation_split=0.5))).run()
    Trainer(build_config(preset(output_dir=str(tmp_path / "b"), stages=stages))).run()
    assert _metadata(tmp_path / "a" / "pti.safetensors")["ss_num_validation_images"] == "2"
    assert _metadata(tmp_path / "b" / "pti.safetensors")["ss_num_validation_images"] == "0"
