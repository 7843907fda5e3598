"""Data inputs, round 4: folders, captions and bucket settings as users' datasets give them end in kohya's behaviour
or a message naming the file or key, before any model loads. Expected values are worked out by hand from kohya's
``library/train_util.py`` and ``library/config_util.py``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.buckets import choose_bucket, make_buckets
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.scanning import scan_images

from .conftest import draw_character


def _scan(raw: dict) -> list:
    config = build_config({"resolution": 32} | raw)
    return scan_images(config, load_subsets(config))


def _image(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _folder(root: Path, name: str = "1_tok1") -> Path:
    folder = root / "data" / name
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------- buckets

def test_the_bucket_nearest_in_width_over_height_is_kohyas_first_of_equal_errors():
    """kohya picks the bucket whose width / height is nearest the image's (a difference of ratios, not of their logs);
    of equal errors, the first bucket in sorted order."""
    buckets = make_buckets(512 * 512, 256, 1024, 64)
    # 1218 / 636 = 1.915: 640/384 = 1.667 is 0.248 away, 704/320 = 2.2 is 0.285 away
    assert choose_bucket((1218, 636), buckets, False, 512 * 512, 64) == (640, 384)
    # 3400 / 3841 = 0.885: 448/576 = 0.778 is 0.107 away, 512/512 = 1 is 0.115 away
    assert choose_bucket((3400, 3841), buckets, False, 512 * 512, 64) == (448, 576)
    assert choose_bucket((1000, 500), buckets, False, 512 * 512, 64) == (704, 320)


def test_bucket_no_upscale_scales_a_large_image_down_to_kohyas_own_bucket():
    """kohya's no-upscale bucket of an image over the area is not one of the predefined buckets: the image is scaled
    to the area (3000x600 at 512x512: 1144.9 x 229.0), the height rounded to steps (192) keeps the aspect exactly
    (960 / 192 = 5), the width rounded (1088 / 192 = 5.67) does not: 960 x 192."""
    buckets = make_buckets(512 * 512, 256, 1024, 64)
    assert choose_bucket((3000, 600), buckets, True, 512 * 512, 64) == (960, 192)
    assert choose_bucket((300, 200), buckets, True, 512 * 512, 64) == (256, 192)  # under the area: rounded down


def test_bucket_no_upscale_skips_an_image_with_a_side_under_the_step_naming_it(tmp_path, caplog):
    """kohya rounds a side under bucket_reso_steps down to a 0 px bucket and fails; it was put in a bucket larger
    than the image (an upscale bucket_no_upscale forbids)."""
    folder = _folder(tmp_path)
    _image(folder / "square.png", (80, 80))
    _image(folder / "thin.png", (40, 80))
    with caplog.at_level(logging.WARNING):
        items = _scan({"train_data_dir": str(tmp_path / "data"), "resolution": 64, "enable_bucket": True,
                       "bucket_no_upscale": True, "min_bucket_reso": 64, "max_bucket_reso": 128})
    assert [(i.path.name, i.bucket) for i in items] == [("square.png", (64, 64))]
    assert "thin.png: 40x80 has a side under bucket_reso_steps = 64 px" in caplog.text


def test_a_bucket_range_off_the_step_is_rounded_as_kohya_with_a_warning(tmp_path, caplog):
    """kohya rounds min_bucket_reso down and max_bucket_reso up to multiples of bucket_reso_steps; unrounded, the
    buckets had sides such as 300 and 364 px, not multiples of the VAE's factor."""
    folder = _folder(tmp_path)
    _image(folder / "wide.png", (700, 300))
    with caplog.at_level(logging.WARNING):
        items = _scan({"train_data_dir": str(tmp_path / "data"), "resolution": 512, "enable_bucket": True,
                       "min_bucket_reso": 300, "max_bucket_reso": 1000})
    assert items[0].bucket == (768, 320)  # 700 / 300 = 2.33: 768/320 = 2.4 is nearest
    assert "min_bucket_reso 300 is not a multiple of bucket_reso_steps = 64: 256 is used" in caplog.text
    assert "max_bucket_reso 1000 is not a multiple of bucket_reso_steps = 64: 1024 is used" in caplog.text


def test_the_rounded_bucket_range_is_what_the_resolution_is_checked_against(tmp_path):
    """max_bucket_reso = 500 is 512 for kohya, so resolution 512 fits (it was refused); a min_bucket_reso under the
    step rounds to 0, on which kohya fails: refused naming it."""
    folder = _folder(tmp_path)
    _image(folder / "a.png", (64, 64))
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"[[datasets]]\nresolution = 512\nenable_bucket = true\nmax_bucket_reso = 500\n"
                       f"[[datasets.subsets]]\nimage_dir = '{folder}'\n")
    config = build_config({"dataset_config": str(dataset)})
    (subset,) = load_subsets(config)
    assert subset.bucket_settings == (True, 256, 512, 64, False)
    with pytest.raises(ConfigError, match="min_bucket_reso = 32 is under bucket_reso_steps = 64; .* at least 64"):
        _scan({"train_data_dir": str(tmp_path / "data"), "resolution": 512, "enable_bucket": True,
               "min_bucket_reso": 32})


def test_a_bucket_range_that_rounds_to_0_is_read_with_bucket_no_upscale_which_ignores_it(tmp_path):
    """kohya's bucket_no_upscale makes no bucket list from min/max_bucket_reso (it says it ignores them): a
    min_bucket_reso under the step trains there (it was refused); the image's bucket is its size rounded to steps."""
    folder = _folder(tmp_path)
    _image(folder / "a.png", (150, 100))
    items = _scan({"train_data_dir": str(tmp_path / "data"), "resolution": 128, "enable_bucket": True,
                   "bucket_no_upscale": True, "min_bucket_reso": 32})
    assert [i.bucket for i in items] == [(128, 64)]


# ----------------------------------------------------------------------------- files and folders

def test_hidden_files_are_left_out_as_kohyas_glob_leaves_them(tmp_path, caplog):
    """macOS's ``._name.png`` copies (not images) and ``.name.png`` files: kohya's glob never sees them. They were
    scanned (a hidden image trained) or warned about, and in a conditioning_data_dir refused as extra masks."""
    folder = _folder(tmp_path)
    draw_character(folder / "a.png", 0)
    draw_character(folder / ".hidden.png", 2)
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (32, 32), 255).save(masks / "a.png")
    (masks / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folder}'\nconditioning_data_dir = '{masks}'\n")
    with caplog.at_level(logging.WARNING):
        plain = _scan({"train_data_dir": str(tmp_path / "data")})
        masked = _scan({"dataset_config": str(dataset), "masked_loss": True})
    assert [i.path.name for i in plain] == ["a.png"] and "._a.png" not in caplog.text
    assert [(i.path.name, i.mask_path.name) for i in masked] == [("a.png", "a.png")]


def test_files_of_an_image_type_that_is_not_read_are_named(tmp_path, caplog):
    folder = _folder(tmp_path)
    draw_character(folder / "a.png", 0)
    Image.new("RGB", (32, 32)).save(folder / "b.gif")
    Image.new("RGB", (32, 32)).save(folder / "c.TIFF")
    with caplog.at_level(logging.WARNING):
        assert [i.path.name for i in _scan({"train_data_dir": str(tmp_path / "data")})] == ["a.png"]
    assert "2 file(s) in " in caplog.text and "are of an image type that is not read" in caplog.text
    assert "b.gif, c.TIFF" in caplog.text


def test_the_repeats_of_a_folder_are_its_name_up_to_the_first_underscore(tmp_path, caplog):
    """kohya reads ``int(name.split("_")[0])``: ``5_`` and ``3`` are folders of 5 and 3 repeats (they were ignored);
    ``-1_x`` has -1 repeats, ignored as num_repeats < 1; ``x_tok1`` has none, ignored with a warning."""
    for name, offset in (("5_", 0), ("3", 1), ("-1_neg", 2), ("x_tok1", 3)):
        draw_character(_folder(tmp_path, name) / "a.png", offset)
    with caplog.at_level(logging.WARNING):
        items = _scan({"train_data_dir": str(tmp_path / "data")})
    assert sorted((i.path.parent.name, i.num_repeats) for i in items) == [("3", 3), ("5_", 5)]
    assert "num_repeats is -1" in caplog.text and "ignoring folder" in caplog.text and "x_tok1" in caplog.text


def test_an_image_named_with_a_face_box_takes_the_caption_of_its_name_without_it(tmp_path):
    """kohya's ``read_caption``: ``face_10_12_4_4.png`` without ``face_10_12_4_4.txt`` reads ``face.txt`` (one
    caption for the crops of a face detector); its own caption file comes first. It took the template."""
    folder = _folder(tmp_path)
    draw_character(folder / "face_10_12_4_4.png", 0)
    draw_character(folder / "face_20_12_4_4.png", 1)
    draw_character(folder / "b_c_d.png", 2)  # fewer than five parts: no fallback to b.txt
    (folder / "face.txt").write_text("tok1, shared caption")
    (folder / "face_20_12_4_4.txt").write_text("tok1, own caption")
    (folder / "b.txt").write_text("tok1, not this one")
    items = {i.path.name: i.caption for i in _scan({"train_data_dir": str(tmp_path / "data")})}
    assert items == {"face_10_12_4_4.png": "tok1, shared caption", "face_20_12_4_4.png": "tok1, own caption",
                     "b_c_d.png": "tok1"}  # its folder's name
