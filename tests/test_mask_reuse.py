"""Loss masks without repeated work: an ``alpha_mask`` image is decoded once per draw (its pixels and its alpha from
one read), once by the start-up scan (the alpha warnings come from that read), and once per image and flip when the
latent cache is filled; a latent-sized mask is used as it is by the loss (area interpolation to the same size is the
identity, bit for bit). Expected masks are written out by hand (alpha 0 on the left half), opens are counted at
``PIL.Image.open``.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pti_plugin.config import Config
from pti_plugin.config_loading import build_config
from pti_plugin.data.augment import Augmentation
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.scanning import scan_images
from pti_plugin.diffusion_loss import per_sample_loss

from .conftest import draw_character


def _alpha_folder(root: Path) -> Path:
    """``root/1_tok1``: 0.png transparent everywhere, 1.png without alpha, 2.png and 3.png clear on the left half."""
    folder = root / "1_tok1"
    folder.mkdir(parents=True)
    for i in range(4):
        draw_character(folder / f"{i}.png", 3 * i)
        if i == 1:
            continue
        alpha = np.full((32, 32), 255, np.uint8)
        alpha[:, : 32 if i == 0 else 16] = 0
        image = Image.open(folder / f"{i}.png").convert("RGB")
        image.putalpha(Image.fromarray(alpha))
        image.save(folder / f"{i}.png")
    return root


@pytest.fixture
def opens(monkeypatch) -> collections.Counter:
    """The image files ``PIL.Image.open`` opens, by name, counted."""
    counter: collections.Counter = collections.Counter()
    real = PIL.Image.open

    def counting(path, *args, **kwargs):
        counter[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    return counter


def _items(tmp_path: Path, opens: collections.Counter):
    """The scanned items of :func:`_alpha_folder` (``opens`` counts from the scan on)."""
    config = build_config({"train_data_dir": str(_alpha_folder(tmp_path / "data")), "resolution": 32,
                           "alpha_mask": True, "flip_aug": True})
    opens.clear()
    return scan_images(config, load_subsets(config))


def test_the_scan_reads_each_alpha_image_once_and_still_warns(tmp_path, opens, caplog):
    with caplog.at_level(logging.WARNING):
        items = _items(tmp_path, opens)
    assert sorted(i.path.name for i in items) == ["0.png", "1.png", "2.png", "3.png"]
    assert dict(opens) == {"0.png": 1, "1.png": 1, "2.png": 1, "3.png": 1}
    assert "1 image(s) have no alpha channel: their loss mask is all ones (as in kohya): 1.png" in caplog.text
    assert "1 image(s) are transparent everywhere (alpha 0): their loss is 0, they train nothing: 0.png" in caplog.text


def test_an_uncached_draw_decodes_its_image_once_for_pixels_and_mask(tmp_path, opens):
    from pti_plugin.data.augment import augmented_pixels
    from pti_plugin.data.batch_source import DrawSettings, MicroBatchDraws
    from pti_plugin.data.sample_order import SampleOrder
    from pti_plugin.data.scanning import build_entries

    items = _items(tmp_path, opens)
    entries = build_entries(items)
    order = SampleOrder([items[i].bucket for i in entries], 4, 0, 0, 2)
    draws = MicroBatchDraws(items, entries, [order], DrawSettings(0, "tok1", 1, 4, 1, 0, latents_cached=False))
    halves = set()  # the flips of the half-clear images checked
    for step in range(2):
        opens.clear()
        drawn = draws[(0, step, 0)]
        assert sum(opens.values()) == 4 and all(opens[Path(p).name] == drawn.paths.count(p) for p in drawn.paths)
        for path, augmentation, pixels, mask in zip(drawn.paths, drawn.augmentations, drawn.pixels, drawn.masks):
            name = Path(path).name
            expected = torch.zeros(32, 32) if name == "0.png" else torch.ones(32, 32)  # 1.png: no alpha, all ones
            if name in ("2.png", "3.png"):
                expected[:, 16:] = 0 if augmentation.flip else 1  # the clear left half, mirrored by a flip
                expected[:, :16] = 1 if augmentation.flip else 0
                halves.add(augmentation.flip)
            assert torch.equal(mask, expected), name
            item = next(i for i in items if str(i.path) == path)
            assert torch.equal(pixels, augmented_pixels(item, augmentation))  # the pixels as read alone (on white)
    assert halves == {False, True}

def test_filling_the_latent_cache_decodes_each_image_once_per_flip(tiny_model, tmp_path, opens):
    from diffusers import AutoencoderKL

    from pti_plugin.data.latents import LatentSource

    items = _items(tmp_path, opens)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    source = LatentSource(vae, items, 0, cache=True, to_disk=False)
    opens.clear()
    source.fill_cache()
    assert dict(opens) == {"0.png": 2, "1.png": 2, "2.png": 2, "3.png": 2}  # the image and its flip
    right = torch.zeros(1, 16, 16)
    right[..., 8:] = 1
    assert torch.equal(source.mask_for(2, Augmentation(), (16, 16)), right)
    assert torch.equal(source.mask_for(2, Augmentation(flip=True), (16, 16)), right.flip(-1))


def test_area_interpolation_to_the_same_size_is_the_identity_and_the_loss_skips_it(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, 1, 8, 8), (3, 1, 13, 7), (1, 1, 64, 48)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            mask = torch.rand(shape, generator=generator).to(dtype)
            assert torch.equal(F.interpolate(mask, size=shape[2:], mode="area"), mask)
    prediction, target = torch.randn(2, 4, 6, 8, generator=generator), torch.randn(2, 4, 6, 8, generator=generator)
    mask = torch.rand(2, 1, 6, 8, generator=generator)
    expected = ((prediction - target) ** 2 * mask).mean(dim=(1, 2, 3))

    def refused(*args, **kwargs):
        raise AssertionError("a latent-sized mask is interpolated")

    monkeypatch.setattr(F, "interpolate", refused)
    assert torch.equal(per_sample_loss(prediction, target, None, None, Config(), mask), expected)
    assert torch.equal(per_sample_loss(prediction, target, None, None, Config(), mask[:, 0]), expected)  # [b, h, w]
