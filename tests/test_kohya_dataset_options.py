"""kohya's dataset options resize_interpolation, face_crop_aug_range, caption_extention and its textual inversion's
use_object_template / use_style_template: pixels against PIL directly, the face crop against kohya's rule worked
out by hand, captions against kohya's template strings."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.augment import Augmentation, augmented_pixels, draw_augmentation
from pti_plugin.data.caption_templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.latents import LatentSource
from pti_plugin.data.sample_order import stage_order
from pti_plugin.data.samples import draw_sample
from pti_plugin.data.scanning import build_entries, scan_images
from pti_plugin.dataset_preview import preview_dataset

#: kohya's resize_interpolation names and the PIL filters kohya's get_pil_interpolation gives them.
PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
               "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
               "area": Image.Resampling.HAMMING, "box": Image.Resampling.BOX}
FACE_COLOUR = (250, 10, 10)


def _noise_image(path, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folder(tmp_path, name="1_tok1"):
    folder = tmp_path / "data" / name
    folder.mkdir(parents=True)
    return folder


def _items(raw, check_paths=True):
    config = build_config(raw, check_paths=check_paths)
    return config, scan_images(config, load_subsets(config))


def _expected(path, resized, box, resample):
    """What the dataset must feed: the file resized by PIL itself and cropped, in [-1, 1] as [3, H, W]."""
    image = Image.open(path).convert("RGB").resize(resized, resample).crop(box)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def test_resize_interpolation_resizes_with_each_kohya_filter(tmp_path):
    folder = _folder(tmp_path)
    _noise_image(folder / "0.png")  # 48x32 to 16x16: resized to 24x16, centre crop from x = 4
    base = {"train_data_dir": str(tmp_path / "data"), "resolution": 16}
    pixels = {}
    for name in [None, *PIL_FILTERS]:
        _, (item,) = _items(base | ({"resize_interpolation": name} if name else {}))
        pixels[name] = augmented_pixels(item, Augmentation())
        expected = _expected(folder / "0.png", (24, 16), (4, 0, 20, 16), PIL_FILTERS[name or "lanczos"])
        assert torch.equal(pixels[name], expected), name
    assert not torch.equal(pixels["nearest"], pixels["lanczos"]) and not torch.equal(pixels["box"], pixels["area"])


def test_resize_interpolation_per_dataset_and_subset(tmp_path):
    """kohya: a subset's own resize_interpolation, else its dataset's (then the top-level key)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _noise_image(tmp_path / name / "0.png", seed=1)
    (tmp_path / "dataset.toml").write_text(
        "[[datasets]]\nresolution = 16\nresize_interpolation = 'nearest'\n"
        "[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nimage_dir = 'b'\nresize_interpolation = 'box'\n")
    _, items = _items({"dataset_config": str(tmp_path / "dataset.toml"), "resize_interpolation": "bicubic"})
    for item, resample in zip(items, (Image.Resampling.NEAREST, Image.Resampling.BOX)):
        assert torch.equal(augmented_pixels(item, Augmentation()), _expected(item.path, (24, 16), (4, 0, 20, 16), resample))


def _face_image(path, size=(200, 160), face=(100, 50, 140, 90)):
    """Grey noise with a face-coloured square ``face`` (left, top, right, bottom exclusive)."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(90, 160, (size[1], size[0], 3), dtype=np.uint8))
    ImageDraw.Draw(image).rectangle([face[0], face[1], face[2] - 1, face[3] - 1], fill=FACE_COLOUR)
    image.save(path)


def _face_bbox(pixels):
    """(left, top, right, bottom) of the face-coloured pixels of a [3, H, W] tensor in [-1, 1]."""
    array = ((pixels.permute(1, 2, 0) + 1.0) * 127.5).round().numpy()
    face = (array[..., 0] > 200) & (array[..., 1] < 60) & (array[..., 2] < 60)
    ys, xs = np.nonzero(face)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_a_fixed_face_crop_puts_the_face_in_the_crop_at_the_range_scale(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "img_120_70_40_40.png"  # face centre (120, 70), 40x40
    _face_image(path)
    _, (item,) = _items({"train_data_dir": str(tmp_path / "data"), "resolution": 64, "face_crop_aug_range": [2.0, 2.0],
                         "cache_latents": True})  # a fixed face crop: cacheable
    pixels = augmented_pixels(item, draw_augmentation(item, torch.Generator().manual_seed(0)))
    # kohya: the crop's shorter side (64) is 2 faces (40 px) -> scale 0.8: 200x160 -> 160x128; face centre (96, 56);
    # the 64x64 crop centred on it: left 96 - 32 = 64, top 56 - 32 = 24
    assert torch.equal(pixels, _expected(path, (160, 128), (64, 24, 128, 88), Image.Resampling.LANCZOS))
    assert _face_bbox(pixels) == (16, 16, 48, 48)  # the face: 32 px, half the crop, in its middle
    assert item.image_size == (64, 64)  # SDXL's original size: the crop's, as kohya's


def test_a_face_crop_range_draws_scales_that_keep_the_face_inside(tmp_path):
    folder = _folder(tmp_path)
    _face_image(folder / "img_120_70_40_40.png")
    _, (item,) = _items({"train_data_dir": str(tmp_path / "data"), "resolution": 64, "face_crop_aug_range": "1.5,3.0"})
    sizes = set()
    for seed in range(12):
        augmentation = draw_augmentation(item, torch.Generator().manual_seed(seed))
        assert not augmentation.cacheable
        left, top, right, bottom = _face_bbox(augmented_pixels(item, augmentation))
        sizes.add(right - left)
        assert 0 < left and 0 < top and right < 64 and bottom < 64  # the face lies inside the crop
        assert 64 / 3.0 - 1 <= right - left <= 64 / 1.5 + 1 and abs((right - left) - (bottom - top)) <= 1
    assert len(sizes) > 3  # the scale is drawn per sample


def test_an_image_without_a_face_box_takes_the_usual_crop(tmp_path):
    folder = _folder(tmp_path)
    _noise_image(folder / "plain.png", size=(96, 64))
    _, (item,) = _items({"train_data_dir": str(tmp_path / "data"), "resolution": 32, "face_crop_aug_range": [2.0, 4.0]})
    assert item.face_box is None
    pixels = augmented_pixels(item, draw_augmentation(item, torch.Generator().manual_seed(0)))
    assert torch.equal(pixels, _expected(folder / "plain.png", (48, 32), (8, 0, 40, 32), Image.Resampling.LANCZOS))


def test_caption_extention_reads_the_captions_caption_extension_reads(tmp_path):
    folder = _folder(tmp_path)
    for i in range(2):
        _noise_image(folder / f"{i}.png", seed=i)
        (folder / f"{i}.caption").write_text(f"tok1 pose {i}")
    base = {"train_data_dir": str(tmp_path / "data"), "resolution": 16}
    reference = [i.caption for i in _items(base | {"caption_extension": ".caption"})[1]]
    assert reference == ["tok1 pose 0", "tok1 pose 1"]
    config, items = _items(base | {"caption_extension": ".txt", "caption_extention": ".caption"})  # the alias wins
    assert [i.caption for i in items] == reference and config.caption_extension == ".caption"


def test_templates_replace_the_training_captions_in_inversion_stages(tmp_path):
    folder = _folder(tmp_path)
    _noise_image(folder / "0.png")
    (folder / "0.txt").write_text("tok1 standing")
    raw = {"train_data_dir": str(tmp_path / "data"), "resolution": 16, "num_vectors_per_token": 2}
    for key, count, first, last in [
        ("use_object_template", 27, "a photo of a tok1 tok1_1", "a photo of a small tok1 tok1_1"),
        ("use_style_template", 19, "a painting in the style of tok1 tok1_1", "a large painting in the style of tok1 tok1_1"),
    ]:
        config, items = _items(raw | {key: True})
        entries = build_entries(items)
        captions = {}
        for stage in (0, 1):  # the default stages: inversion, then lora
            order = stage_order(config, stage, [items[i].bucket for i in entries], 1)
            captions[stage] = [draw_sample(items, entries, order, config.seed, stage, step, 0, "tok1", 2).caption
                               for step in range(300)]
        assert captions[1] == ["tok1 tok1_1 standing"] * 300  # kohya's train_network has no templates
        templates = OBJECT_TEMPLATES if key == "use_object_template" else STYLE_TEMPLATES
        assert len(templates) == count and templates[0].format("tok1 tok1_1") == first
        assert templates[-1].format("tok1 tok1_1") == last
        assert set(captions[0]) == {t.format("tok1 tok1_1") for t in templates}  # every template, nothing else
        previewed = [s.caption for s in preview_dataset(config, n=6, stage_index=0).samples]  # the preview's order
        assert set(previewed) <= set(captions[0]) and len(set(previewed)) > 1


def test_latent_cache_key_names_the_filter_and_face_crop_only_when_they_change_pixels(tmp_path):
    folder = _folder(tmp_path)
    _noise_image(folder / "img_20_16_8_8.png")
    vae = torch.nn.Linear(1, 1)
    vae.config = types.SimpleNamespace(scaling_factor=0.18215)
    base = {"train_data_dir": str(tmp_path / "data"), "resolution": 16}
    keys = {}
    for name, extra in [("default", {}), ("lanczos", {"resize_interpolation": "lanczos"}),
                        ("nearest", {"resize_interpolation": "nearest"}), ("face", {"face_crop_aug_range": [2.0, 2.0]})]:
        keys[name] = LatentSource(vae, _items(base | extra)[1], 0, True, True).cache_key(0)
    assert keys["default"] == keys["lanczos"]  # the same pixels: the file written before these options is reused
    assert len({keys["default"], keys["nearest"], keys["face"]}) == 3


@pytest.mark.parametrize("raw, message", [
    ({"resize_interpolation": "fancy"}, "key 'resize_interpolation' expects one of lanczos, nearest, bilinear, linear, "
                                        "bicubic, cubic, area, box"),
    ({"face_crop_aug_range": [4.0, 2.0]}, "key 'face_crop_aug_range' expects two numbers [lo, hi] with 0 < lo <= hi"),
    ({"face_crop_aug_range": [0.0, 2.0]}, "key 'face_crop_aug_range' expects two numbers [lo, hi] with 0 < lo <= hi"),
    ({"face_crop_aug_range": [2.0]}, "key 'face_crop_aug_range' expects two numbers [lo, hi]"),
    ({"face_crop_aug_range": "2,x"}, "key 'face_crop_aug_range' expects two numbers [lo, hi]"),
    ({"caption_extention": "a b"}, "key 'caption_extention' must be a file extension"),
    ({"use_object_template": True, "use_style_template": True}, "key 'use_style_template' and use_object_template"),
    ({"use_style_template": True, "stages": [{"kind": "lora"}]}, "key 'use_style_template' replaces the training captions"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as error:
        build_config({"train_data_dir": "/d", "resolution": 64} | raw, check_paths=False)
    assert message in str(error.value)


@pytest.mark.parametrize("name, raw, message", [
    ("img_1_2_3_4.png", {"enable_bucket": True, "resolution": 256}, "face_crop_aug_range applies only without buckets"),
    ("img_1_2_3_4.png", {"cache_latents": True}, "face_crop_aug_range = [2.0, 3.0] cannot be combined with cache_latents"),
    ("a_b_c_d_e.png", {}, "face_crop_aug_range: "),  # kohya reads the last four parts as the face box: it fails
    ("img_10_10_0_0.png", {}, "has no size"),
    ("img_10_10_4_4.png", {"resolution": 64}, "is 48x32, smaller than the resolution 64x64"),
])
def test_face_crop_problems_are_refused_at_start_up(tmp_path, name, raw, message):
    folder = _folder(tmp_path)
    _noise_image(folder / name)
    with pytest.raises(ConfigError) as error:
        _items({"train_data_dir": str(tmp_path / "data"), "resolution": 16, "face_crop_aug_range": [2.0, 3.0]} | raw)
    assert message in str(error.value) and "face_crop_aug_range" in str(error.value)
