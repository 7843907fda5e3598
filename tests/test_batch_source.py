"""Batches from the DataLoader-backed micro-batch stream: worker processes change nothing, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.augment import augmented_pixels
from pti_plugin.data.batch_source import DrawSettings, MicroBatchDraws, MicroBatchStream
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.sample_order import SampleOrder
from pti_plugin.data.samples import draw_sample
from pti_plugin.data.scanning import build_entries, scan_images
from pti_plugin.trainer import Trainer

STAGES = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
          {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]


def _outputs(raw: dict) -> dict[str, torch.Tensor]:
    config = build_config(raw)
    Trainer(config).run()
    out = Path(config.output_dir)
    return load_file(out / "pti.safetensors") | {"emb_params": load_file(out / "tok1.safetensors")["emb_params"]}


@pytest.mark.parametrize("data", [
    {"flip_aug": True, "cache_latents": True},  # workers draw; the cached latents serve every sample
    {"flip_aug": True, "color_aug": True, "random_crop": True, "gradient_accumulation_steps": 2,
     "persistent_data_loader_workers": True},  # workers make the pixels, the training process encodes them
], ids=["cached", "augmented"])
def test_two_workers_train_bit_identically_to_in_process_loading(preset, tmp_path, data):
    raw = preset(stages=STAGES, save_precision="float", train_batch_size=1, **data)
    in_process = _outputs(raw | {"output_dir": str(tmp_path / "w0")})
    workers = _outputs(raw | {"output_dir": str(tmp_path / "w2"), "max_data_loader_n_workers": 2})
    assert in_process.keys() == workers.keys() and any(k.endswith("lora_up.weight") for k in workers)
    assert all(torch.equal(in_process[k], workers[k]) for k in in_process)


def _draws(raw: dict, cached: bool) -> MicroBatchDraws:
    config = build_config(raw)
    items = scan_images(config, load_subsets(config, None))
    entries = build_entries(items)
    orders = [SampleOrder([items[i].bucket for i in entries], 4, config.seed, s) for s in range(2)]
    return MicroBatchDraws(items, entries, orders, DrawSettings(config.seed, "tok1", 1, 2, 1, 0, cached))


def test_worker_draws_are_the_preview_draws_from_a_resumed_step_on(preset):
    """In worker processes, from a resumed step, skipping a step's unused micro-batch: every slot holds the
    draw the dataset preview shows for (seed, stage, step, slot), and pixels exactly where no cache serves it."""
    draws = _draws(preset(flip_aug=True, color_aug=True, train_batch_size=2), cached=True)
    stream = MicroBatchStream(draws, workers=2, persistent=False, accumulation=2)
    stream.start_stage(1, 3, 6)
    got = [stream.get(1, 3, 0), stream.get(1, 4, 0), stream.get(1, 4, 1), stream.get(1, 5, 1)]  # (3, 1), (5, 0) unused
    stream.close()
    assert [d.slots for d in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for drawn in got:
        _, step, _ = drawn.key
        for slot, index, augmentation, caption, pixels in zip(drawn.slots, drawn.item_indices, drawn.augmentations,
                                                              drawn.captions, drawn.pixels):
            expected = draw_sample(draws.items, draws.entries, draws.orders[1], draws.settings.seed, 1, step, slot, "tok1", 1)
            assert (index, augmentation, caption) == (expected.item_index, expected.augmentation, expected.caption)
            if augmentation.cacheable:
                assert pixels is None
            else:
                assert torch.equal(pixels, augmented_pixels(draws.items[index], augmentation))
    assert any(p is not None for d in got for p in d.pixels) and any(p is None for d in got for p in d.pixels)


def test_negative_worker_count_is_refused(preset):
    with pytest.raises(ConfigError, match="'max_data_loader_n_workers' must be >= 0, got -1"):
        build_config(preset(max_data_loader_n_workers=-1))
