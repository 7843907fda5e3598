"""Shared fixtures: a tiny SD1.5-shaped model, a small kohya image folder, and preset builders.

Torch runs on one thread: on a 2-core machine two threads stall whenever a neighbour is busy.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pti_plugin.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from pti_plugin.models.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


def draw_character(path: Path, offset: int) -> None:
    """A 32 px two-coloured square (red over blue) on white, shifted right by ``offset`` pixels."""
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([4 + offset, 4, 16 + offset, 10], fill=(220, 20, 20))
    draw.rectangle([4 + offset, 10, 16 + offset, 16], fill=(20, 20, 220))
    image.save(path)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """kohya layout: ``2_tok1/`` with 4 images, two captioned (with the token) and two without."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "2_tok1"
    folder.mkdir()
    for i in range(4):
        draw_character(folder / f"{i}.png", 3 * i)
        if i % 2 == 0:
            (folder / f"{i}.txt").write_text("an anime illustration of tok1")
    return root


def make_preset(tiny_model: Path, tiny_dataset: Path, out: Path, /, **overrides) -> dict:
    """A raw preset dict for a short run on the tiny model writing to ``out``; keyword arguments override keys
    (the ``preset`` fixture's builder, for module fixtures that train one run for several tests)."""
    raw = {
        "pretrained_model_name_or_path": str(tiny_model),
        "train_data_dir": str(tiny_dataset),
        "resolution": 32,
        "output_dir": str(out),
        "train_batch_size": 2,
        "max_train_steps": 3,
        "log_every_n_steps": 1,
        "network_dim": 4,
        "network_alpha": 4.0,
        "stages": [
            {"name": "inversion", "kind": "inversion", "learning_rate": 5e-2},
            {"name": "lora", "kind": "lora", "learning_rate": 1e-2},
        ],
    }
    raw.update(overrides)
    if "max_train_steps" not in overrides and (raw.get("max_train_epochs") or all(
            "steps" in s or "max_train_epochs" in s for s in raw["stages"])):
        del raw["max_train_steps"]  # no stage would use it: a preset given to the CLI would be refused
    return raw


@pytest.fixture
def preset(tiny_model, tiny_dataset, tmp_path):
    """Build a raw preset dict for a short run on the tiny model; keyword arguments override keys."""

    def make(**overrides):
        return make_preset(tiny_model, tiny_dataset, tmp_path / "out", **overrides)

    return make


def pytest_collection_finish(session) -> None:
    """Every module and object the collected tests imported is kept out of the cyclic garbage collector's scans
    (``gc.freeze``): the trainer calls ``accelerator.free_memory()`` (a full ``gc.collect``) after each stage, which
    in a test process holding torch, diffusers, transformers and Ray walks millions of objects (~0.3 s a stage, a
    sixth of some test files' time). Objects the tests create later are collected as before."""
    gc.collect()
    gc.freeze()
