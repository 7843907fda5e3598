"""Datasets: kohya folders, dataset_config, captions and the token, buckets, sample order, latent cache."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.buckets import choose_bucket, make_buckets
from pti_plugin.data.captions import CaptionError, expand_token, resolve_caption
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.latents import LatentSource
from pti_plugin.data.sample_order import SampleOrder
from pti_plugin.data.scanning import scan_images

from .conftest import draw_character


def _config(tmp_path, **raw):
    return build_config({"train_data_dir": str(tmp_path), "resolution": 32} | raw)


def test_kohya_folder_repeats_captions_and_corrupt_images(tmp_path, caplog):
    folder = tmp_path / "3_tok1"
    folder.mkdir()
    for i in range(3):
        draw_character(folder / f"{i}.png", i)
    (folder / "0.txt").write_text("tok1 standing in the snow")
    (folder / "1.txt").write_text("a girl standing")  # no token: prepended, warned once with the count
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes").mkdir()  # not <repeats>_<name>: ignored with a warning
    config = _config(tmp_path)
    with caplog.at_level(logging.WARNING):
        items = scan_images(config, load_subsets(config))
    assert [(i.path.name, i.caption, i.num_repeats) for i in items] == [
        ("0.png", "tok1 standing in the snow", 3),
        ("1.png", "tok1, a girl standing", 3),
        ("2.png", "tok1", 3),  # no caption file: its folder's name (kohya's class_tokens)
    ]
    assert "broken.png: not a readable image" in caplog.text
    assert "1 caption(s) did not contain 'tok1'" in caplog.text


def test_caption_naming_the_token_twice_is_an_error(tmp_path):
    with pytest.raises(CaptionError, match="x.png names the token 'tok1' 2 times"):
        resolve_caption(tmp_path / "x.png", "tok1 and tok1", "tok1", None, "{}")
    assert resolve_caption(tmp_path / "x.png", None, "tok1", "tok1 character", "{}") == ("tok1 character", False)
    assert expand_token("a tok1, tok12", "tok1", 3) == "a tok1 tok1_1 tok1_2, tok12"


def test_dataset_config_levels_and_refused_options(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        draw_character(tmp_path / name / "0.png", 0)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(
        "[general]\nflip_aug = true\ncaption_extension = '.caption'\n"
        "[[datasets]]\nresolution = [32, 16]\n"
        "[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 4\nclass_tokens = 'tok1 girl'\n"
        "[[datasets.subsets]]\nimage_dir = 'b'\nflip_aug = false\n"
    )
    config = build_config({"dataset_config": str(dataset)})
    subsets = load_subsets(config)
    assert [(s.image_dir.name, s.num_repeats, s.flip_aug, s.resolution, s.caption_extension) for s in subsets] == [
        ("a", 4, True, (32, 16), ".caption"), ("b", 1, False, (32, 16), ".caption")]
    items = scan_images(config, subsets)
    assert [i.caption for i in items] == ["tok1 girl", "an anime illustration of tok1"]
    assert items[0].bucket == (32, 16)
    dataset.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnetwork_multiplier = 0.5\n")
    with pytest.raises(ConfigError, match="kohya dataset option 'network_multiplier' is not supported by pti-plugin"):
        load_subsets(config)


def test_buckets_follow_aspect_ratio():
    buckets = make_buckets(512 * 512, 256, 1024, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert choose_bucket((1000, 500), buckets, False, 512 * 512, 64) == (704, 320)
    assert choose_bucket((500, 500), buckets, False, 512 * 512, 64) == (512, 512)
    assert choose_bucket((300, 200), buckets, True, 512 * 512, 64) == (256, 192)  # no upscale: own bucket


def test_a_bucket_range_no_width_fits_still_has_kohyas_square_bucket():
    """Resolution 64 with buckets from 64 to 128 in steps of 48: no width in the range has a height in it, so the
    list was empty and the dataset scan died (``min() arg is an empty sequence``); kohya always adds the square."""
    assert make_buckets(64 * 64, 64, 128, 48) == [(48, 48)]
    assert choose_bucket((100, 60), make_buckets(64 * 64, 64, 128, 48), False, 64 * 64, 48) == (48, 48)
    assert (512, 512) in make_buckets(512 * 512, 576, 1024, 64)  # the square even below min_bucket_reso, as kohya


@pytest.mark.parametrize("value", [12, 4, 60])
def test_a_bucket_step_that_is_not_a_multiple_of_8_is_refused_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=f"key 'bucket_reso_steps' expects a multiple of 8 .*got {value}"):
        build_config({"train_data_dir": str(tmp_path), "enable_bucket": True, "bucket_reso_steps": value})


def test_sample_order_covers_every_entry_each_epoch_in_same_bucket_batches():
    buckets = [(32, 32)] * 5 + [(32, 16)] * 3
    order = SampleOrder(buckets, global_batch=2, seed=1, stage_index=0)
    assert order.batches_per_epoch == 3 + 2
    for epoch in range(3):
        batches = order.epoch(epoch)
        seen = Counter(i for b in batches for i in b)
        assert set(seen) == set(range(8))  # every entry at least once
        assert sum(seen.values()) - 8 == 2  # only the two wrap-around fillers repeat
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    assert order.epoch(0) != order.epoch(1)
    assert SampleOrder(buckets, 2, 1, 0).epoch(2) == order.epoch(2)  # a pure function of the seed


def test_cached_latents_equal_uncached(tiny_model, tiny_dataset, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    config = build_config({"train_data_dir": str(tiny_dataset), "resolution": 32, "flip_aug": True})
    items = scan_images(config, load_subsets(config))
    cached = LatentSource(vae, items, seed=3, cache=True, to_disk=False)
    cached.fill_cache()
    plain = LatentSource(vae, items, seed=3, cache=False, to_disk=False)
    for index in range(len(items)):
        for flip in (False, True):
            assert torch.equal(cached.latent(index, flip), plain.latent(index, flip))
    assert cached.latent(0, False).shape == (4, 16, 16)
    assert not torch.equal(cached.latent(0, False), cached.latent(0, True))
