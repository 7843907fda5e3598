"""kohya dataset options: captions (shuffle/keep/dropout/wildcards/separators), reg images and
prior_loss_weight, augmentations, dataset_config levels, refusals, tag frequency, the preview."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.augment import Augmentation, augmented_pixels, draw_augmentation
from pti_plugin.data.captions import CaptionError, CaptionOptions, final_caption, resolve_lines
from pti_plugin.data.dataset import ImageItem, load_subsets
from pti_plugin.data.dataset_stats import tag_frequency
from pti_plugin.data.scanning import balance_reg_repeats, build_entries, scan_images
from pti_plugin.data.sample_order import SampleOrder, sample_generator
from pti_plugin.data.samples import draw_sample
from pti_plugin.dataset_preview import main as preview_main, preview_dataset
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.kohya_options import REFUSED_OPTIONS
from pti_plugin.trainer import Trainer

from .conftest import draw_character

TAGS = "1girl, tok1, red hair, school uniform, smile, standing"


def _item(lines, is_reg=False, **options) -> ImageItem:
    lines = (lines,) if isinstance(lines, str) else tuple(lines)
    return ImageItem(Path("x.png"), lines[0], (32, 32), 1, False, False, is_reg, lines, CaptionOptions(**options))


def _draws(item, n, epoch=1, num_vectors=1, seed=0):
    return [final_caption(item, sample_generator(seed, 0, k, 0, 0xF11B), epoch, "tok1", num_vectors) for k in range(n)]


def _tags(caption):
    return [t.strip() for t in caption.split(",")]


# ----------------------------------------------------------------------------- captions

def test_keep_tokens_with_shuffle_fixes_the_head_and_moves_the_rest():
    item = _item(TAGS.replace("1girl, tok1", "tok1, 1girl"), shuffle_caption=True, keep_tokens=1)
    captions = _draws(item, 100)
    positions: dict[str, set[int]] = {}
    for caption in captions:
        tags = _tags(caption)
        assert tags[0] == "tok1" and sorted(tags) == sorted(_tags(item.caption))
        for i, tag in enumerate(tags):
            positions.setdefault(tag, set()).add(i)
    assert positions["tok1"] == {0}
    assert all(len(p) > 1 for tag, p in positions.items() if tag != "tok1")
    assert captions == _draws(item, 100)  # a pure function of (seed, stage, step, slot)
    assert captions[0] == "tok1, red hair, standing, smile, 1girl, school uniform"  # exact under seed 0


def test_the_token_keeps_its_place_when_it_sits_among_shuffled_tags():
    item = _item(TAGS, shuffle_caption=True)  # keep_tokens = 0: tok1 (index 1) could move; it must not
    captions = _draws(item, 100)
    assert all(_tags(c)[1] == "tok1" for c in captions)
    assert len({_tags(c)[0] for c in captions}) == 5  # every other tag reaches the front
    expanded = _draws(item, 20, num_vectors=3)  # n vectors stay together, in the same place
    assert all(_tags(c)[1] == "tok1 tok1_1 tok1_2" for c in expanded)


def test_tag_dropout_drops_about_half_and_never_the_token():
    item = _item(TAGS, caption_tag_dropout_rate=0.5)
    captions = _draws(item, 1000)
    kept = [len(_tags(c)) - 1 for c in captions]  # tags other than tok1
    assert all("tok1" in _tags(c) for c in captions)
    assert 0.45 < sum(kept) / (5 * 1000) < 0.55
    assert all(_tags(c).index("tok1") == (1 if c.startswith("1girl") else 0) for c in captions)  # its place, or the
    # front when the tag before it was dropped


def test_keep_tokens_separator_keeps_head_and_tail_in_place():
    item = _item("tok1, 1girl ||| smile, hat, sky, standing ||| masterpiece, best quality",
                 shuffle_caption=True, keep_tokens_separator="|||", caption_tag_dropout_rate=0.3)
    captions = _draws(item, 200)
    for caption in captions:
        tags = _tags(caption)
        assert tags[:2] == ["tok1", "1girl"] and tags[-2:] == ["masterpiece", "best quality"] and "|||" not in caption
        assert set(tags[2:-2]) <= {"smile", "hat", "sky", "standing"}
    assert len({tuple(_tags(c)[2:-2]) for c in captions}) > 20
    plain = _item("tok1 ||| a, b ||| c", keep_tokens_separator="|||")  # nothing moves: the separator still goes
    assert _draws(plain, 1) == ["tok1, a, b, c"]


def test_secondary_separator_groups_move_and_drop_as_one_tag():
    item = _item("tok1, 1girl, sky;;;cloud;;;day, outdoors", shuffle_caption=True, secondary_separator=";;;",
                 caption_tag_dropout_rate=0.5, keep_tokens=1)
    captions = _draws(item, 300)
    assert any("sky,cloud,day" in c for c in captions) and any("sky" not in c for c in captions)
    assert all(("sky" in c) == ("sky,cloud,day" in c) and ";;;" not in c for c in captions)
    assert any(c.index("sky") < c.index("1girl") for c in captions if "sky" in c and "1girl" in c)


def test_wildcards_and_multi_line_captions(tmp_path):
    item = _item(["tok1, {simple|white} background, {{retro}}", "tok1 in the rain"], enable_wildcard=True)
    captions = Counter(_draws(item, 300))
    assert set(captions) == {"tok1, simple background, {retro}", "tok1, white background, {retro}", "tok1 in the rain"}
    assert min(captions.values()) > 50
    without = _item(["tok1, {simple|white} background", "tok1 in the rain"])  # first line, braces as written
    assert set(_draws(without, 20)) == {"tok1, {simple|white} background"}
    with pytest.raises(CaptionError, match="x.png puts the token 'tok1' inside a wildcard choice"):
        resolve_lines(Path("x.png"), ["{tok1|girl}, smile"], "tok1", None, "{}", CaptionOptions(enable_wildcard=True))
    lines, prepended = resolve_lines(Path("x.png"), ["a girl", "tok1 smiling"], "tok1", None, "{}",
                                     CaptionOptions(enable_wildcard=True))
    assert lines == ["tok1, a girl", "tok1 smiling"] and prepended


def test_prefix_suffix_and_the_token_they_may_carry():
    options = CaptionOptions(caption_prefix="masterpiece, tok1 |||", caption_suffix=", anime screencap",
                             keep_tokens_separator="|||")
    lines, prepended = resolve_lines(Path("x.png"), ["1girl, smile"], "tok1", None, "{}", options)
    assert lines == ["1girl, smile"] and not prepended  # the prefix names the token
    item = ImageItem(Path("x.png"), lines[0], (32, 32), 1, False, False, False, tuple(lines), options)
    assert _draws(item, 1) == ["masterpiece, tok1, 1girl, smile, anime screencap"]
    with pytest.raises(CaptionError, match="names the token 'tok1' 2 times .caption_prefix/caption_suffix included"):
        resolve_lines(Path("x.png"), ["tok1, smile"], "tok1", None, "{}", options)
    assert resolve_lines(Path("x.png"), None, "tok1", None, "{}", options) == ([""], False)  # no template needed
    plain = CaptionOptions(caption_prefix="best quality,", caption_suffix=", 4k")
    lines, _ = resolve_lines(Path("x.png"), ["1girl"], "tok1", None, "{}", plain)
    assert _draws(ImageItem(Path("x.png"), lines[0], (32, 32), 1, False, True, False, tuple(lines), plain), 1) == [
        "best quality, tok1, 1girl , 4k"]  # kohya joins prefix and suffix with a space


def test_caption_dropout_keeps_the_token_and_empties_reg_captions():
    item = _item(TAGS, caption_dropout_rate=0.25)
    captions = _draws(item, 1000)
    dropped = sum(c == "tok1" for c in captions)
    assert 200 < dropped < 300 and all(c in ("tok1", TAGS) for c in captions)
    reg = _item("1girl, solo", is_reg=True, caption_dropout_rate=0.25)
    assert 200 < sum(c == "" for c in _draws(reg, 1000)) < 300
    every = _item(TAGS, caption_dropout_every_n_epochs=2)
    assert set(_draws(every, 10, epoch=1)) == {TAGS} and set(_draws(every, 10, epoch=4)) == {"tok1"}
    assert _draws(every, 1, epoch=2, num_vectors=2) == ["tok1 tok1_1"]


# ----------------------------------------------------------------------------- augmentations

def test_flip_color_and_random_crop_are_drawn_from_the_sample_generator(tmp_path):
    from PIL import Image

    path = tmp_path / "wide.png"
    draw_character(tmp_path / "small.png", 0)
    Image.open(tmp_path / "small.png").resize((64, 32)).save(path)
    item = ImageItem(path, "tok1", (32, 32), 1, True, False, color_aug=True, random_crop=True)
    draws = [draw_augmentation(item, sample_generator(1, 0, k, 0, 0xF11B)) for k in range(600)]
    assert 0.45 < sum(d.flip for d in draws) / 600 < 0.55
    coloured = [d for d in draws if d.hue_shift or d.gamma != 1.0]
    assert 0.28 < len(coloured) / 600 < 0.38  # kohya's p = 0.33
    assert all(abs(d.hue_shift) <= 8 and 0.95 <= d.gamma <= 1.05 for d in draws)
    assert all(not d.cacheable for d in draws)  # random_crop: never from the latent cache
    # The flip is the generator's first draw, as before these options existed.
    assert draws[3].flip == bool(torch.rand((), generator=sample_generator(1, 0, 3, 0, 0xF11B)) < 0.5)
    centre = augmented_pixels(item, Augmentation())
    left = augmented_pixels(item, Augmentation(crop=(0.0, 0.5)))
    right = augmented_pixels(item, Augmentation(crop=(0.999, 0.5)))
    assert centre.shape == left.shape == (3, 32, 32)
    assert not torch.equal(left, right) and not torch.equal(left, centre)
    hue = augmented_pixels(item, Augmentation(hue_shift=8.0))
    assert (hue - centre).abs().max() > 0.05 and torch.equal(augmented_pixels(item, Augmentation(flip=True)), centre.flip(2))


def test_augmentations_that_need_fresh_pixels_refuse_cached_latents(tmp_path):
    (tmp_path / "1_tok1").mkdir()
    draw_character(tmp_path / "1_tok1" / "0.png", 0)
    config = build_config({"train_data_dir": str(tmp_path), "resolution": 32, "color_aug": True, "cache_latents": True})
    with pytest.raises(ConfigError, match="color_aug cannot be combined with cache_latents: cached latents are encoded once"):
        load_subsets(config)
    dataset = tmp_path / "d.toml"
    dataset.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / '1_tok1'}'\nrandom_crop = true\n")
    config = build_config({"dataset_config": str(dataset), "resolution": 32, "cache_latents_to_disk": True})
    with pytest.raises(ConfigError, match=r"d.toml datasets.0.subsets.0: random_crop cannot be combined with cache_latents_to_disk"):
        load_subsets(config)


# ----------------------------------------------------------------------------- dataset_config

def _images(folder: Path, n: int, captions: list[str] | None = None, size=(32, 32)) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_character(folder / f"{i}.png", i % 10)
        if size != (32, 32):
            Image.open(folder / f"{i}.png").resize(size).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(captions[i % len(captions)])
    return folder


def test_dataset_config_inheritance_duplicates_and_resolutions(tmp_path, caplog):
    _images(tmp_path / "char", 2, ["tok1, 1girl, smile"])
    _images(tmp_path / "wide", 1, ["tok1, 1girl, wide"], size=(128, 64))
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens = 1\ncaption_tag_dropout_rate = 0.1\nbatch_size = 2\n"
        "[[datasets]]\nresolution = 32\nkeep_tokens = 2\n"
        "  [[datasets.subsets]]\n  image_dir = 'char'\n  num_repeats = 3\n  caption_prefix = 'best,'\n"
        "  [[datasets.subsets]]\n  image_dir = 'char'\n  num_repeats = 9\n"  # duplicate in the same dataset: ignored
        "  [[datasets.subsets]]\n  image_dir = 'wide'\n  num_repeats = 0\n"  # kohya ignores num_repeats < 1
        "[[datasets]]\nresolution = [128, 64]\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 128\n"
        "  [[datasets.subsets]]\n  image_dir = 'char'\n  keep_tokens = 0\n"  # another dataset: used again
        "  [[datasets.subsets]]\n  image_dir = 'wide'\n"
    )
    with caplog.at_level(logging.WARNING):
        config = build_config({"dataset_config": str(dataset), "train_batch_size": 1})
        subsets = load_subsets(config)
    assert config.train_batch_size == 2 and "batch_size = 2 replaces train_batch_size = 1" in caplog.text
    assert "repeats an earlier subset of the same dataset" in caplog.text and "num_repeats is 0" in caplog.text
    assert [(s.name, s.dataset_index, s.num_repeats, s.caption_options.keep_tokens, s.caption_options.caption_prefix,
             s.resolution, s.caption_options.shuffle_caption) for s in subsets] == [
        ("char", 0, 3, 2, "best,", (32, 32), True), ("char", 1, 1, 0, "", (128, 64), True),
        ("wide", 1, 1, 1, "", (128, 64), True)]
    items = scan_images(config, subsets)
    assert [i.bucket for i in items][:2] == [(32, 32), (32, 32)] and items[-1].bucket == (128, 64)
    assert tag_frequency(items) == {"char": {"tok1": 2, "1girl": 2, "smile": 2}, "wide": {"tok1": 1, "1girl": 1, "wide": 1}}


def test_every_caption_option_of_a_subset_reaches_its_images(tmp_path):
    _images(tmp_path / "a", 1)
    options = {"shuffle_caption": True, "keep_tokens": 2, "caption_separator": ";", "keep_tokens_separator": "|||",
               "secondary_separator": ";;;", "enable_wildcard": True, "caption_prefix": "best", "caption_suffix": "4k",
               "caption_dropout_rate": 0.25, "caption_dropout_every_n_epochs": 3, "caption_tag_dropout_rate": 0.5,
               "token_warmup_min": 2, "token_warmup_step": 0.5}
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
    (tmp_path / "dataset.toml").write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n{lines}")
    config = build_config({"dataset_config": str(tmp_path / "dataset.toml"), "resolution": 32})
    (subset,) = load_subsets(config)
    assert dataclasses.asdict(subset.caption_options) == options  # no option dropped, none left at its default


@pytest.mark.parametrize("body, expected", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\ncache_info = true\n",
     "datasets.0.subsets.0: kohya dataset option 'cache_info' is not supported by pti-plugin (image sizes and captions"),
    ("[general]\nnetwork_multiplier = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "[general]: kohya dataset option 'network_multiplier' is not supported by pti-plugin (per-dataset LoRA "
     "multipliers are not implemented); supported: alpha_mask, batch_size, bucket_no_upscale"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nresolution = 64\n",
     "'resolution' is a dataset option: set it in [[datasets]] or [general]"),
    ("[[datasets]]\nis_reg = true\n[[datasets.subsets]]\nimage_dir = 'a'\n", "'is_reg' belongs in a [[datasets.subsets]] table"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nkeep_token = 1\n", "unknown key 'keep_token'; supported:"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\ncaption_dropout_rate = 1.5\n",
     "'caption_dropout_rate' expects a number in [0, 1], got 1.5"),
    ("[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets]]\nbatch_size = 4\n"
     "[[datasets.subsets]]\nimage_dir = 'a'\n", "the datasets set different batch_size values (2, 4)"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nmetadata_file = 'md.json'\n",
     "DreamBooth-style subsets and metadata_file subsets cannot be mixed in one dataset"),
    ("[[datasets]]\nresolution = 64\nenable_bucket = true\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "resolution 64x64 must lie within min_bucket_reso 256 and max_bucket_reso 1024"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'md.json'\n", "image_dir " + "{tmp}/md.json is a file, not a folder"),
])
def test_dataset_config_refusals_name_the_option_and_file(tmp_path, body, expected):
    _images(tmp_path / "a", 1)
    (tmp_path / "md.json").write_text("{}")
    (tmp_path / "dataset.toml").write_text(body)
    config = build_config({"dataset_config": str(tmp_path / "dataset.toml"), "resolution": 32})
    with pytest.raises(ConfigError) as error:
        load_subsets(config)
    assert str(tmp_path / "dataset.toml") in str(error.value) and expected.format(tmp=tmp_path) in str(error.value)


@pytest.mark.parametrize("repeats, is_reg", [(0, "false"), (1, "true")])
def test_a_dataset_with_no_training_subset_left_says_so(tmp_path, repeats, is_reg):
    """Only regularisation subsets, or only ignored ones (num_repeats 0): the error said 'no usable training image
    in :' with an empty folder list."""
    _images(tmp_path / "a", 1)
    (tmp_path / "dataset.toml").write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = {repeats}\n"
                                           f"is_reg = {is_reg}\n")
    config = build_config({"dataset_config": str(tmp_path / "dataset.toml"), "resolution": 32})
    with pytest.raises(ConfigError, match="no training subset: every subset left is a regularisation one"):
        scan_images(config, load_subsets(config))


def test_top_level_dataset_keys_and_refused_options():
    for key in ("shuffle_caption", "keep_tokens", "caption_prefix", "color_aug", "random_crop", "reg_data_dir",
                "prior_loss_weight", "caption_dropout_every_n_epochs", "enable_wildcard", "in_json"):
        assert key not in REFUSED_OPTIONS
    base = {"train_data_dir": "/d", "resolution": 32}
    assert build_config(base | {"keep_tokens": 2, "shuffle_caption": True}, check_paths=False).keep_tokens == 2
    for raw, expected in [
        ({"cache_info": True}, "kohya option 'cache_info' is not supported by pti-plugin: image sizes and captions"),
        ({"skip_cache_check": True}, "kohya option 'skip_cache_check' is not supported by pti-plugin"),
        ({"caption_tag_dropout_rate": 2.0}, "key 'caption_tag_dropout_rate' expects a number in [0, 1], got 2.0"),
        ({"min_bucket_reso": 4}, "key 'min_bucket_reso' expects an integer >= 8, got 4"),  # the dataset_config's rule
        ({"dataset_config": "/x.toml", "train_data_dir": "", "reg_data_dir": "/r"},
         "'reg_data_dir' is not used with 'dataset_config' (kohya ignores it there)"),
    ]:
        with pytest.raises(ConfigError) as error:
            build_config(base | raw, check_paths=False)
        assert expected in str(error.value)


def test_metadata_file_and_in_json_read_captions_and_tags(tmp_path):
    images = _images(tmp_path / "ft", 3)
    metadata = {
        "0": {"caption": "tok1 standing in the snow", "tags": "1girl, scarf"},
        str(images / "1.png"): {"tags": "1girl, smile"},  # tags only, full path: the token is prepended
        "missing": {"caption": "tok1"},
    }
    (tmp_path / "md.json").write_text(json.dumps(metadata))
    (tmp_path / "d.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'ft'\nmetadata_file = 'md.json'\n"
                                     "num_repeats = 2\n")
    config = build_config({"dataset_config": str(tmp_path / "d.toml"), "resolution": 32})
    items = scan_images(config, load_subsets(config))
    assert [(i.path.name, i.caption, i.num_repeats) for i in items] == [
        ("0.png", "tok1 standing in the snow,1girl, scarf", 2), ("1.png", "tok1, 1girl, smile", 2)]
    assert list(tag_frequency(items)) == ["md.json"]
    top = build_config({"train_data_dir": str(images), "in_json": str(tmp_path / "md.json"), "dataset_repeats": 3,
                        "resolution": 32})
    assert [(i.path.name, i.num_repeats) for i in scan_images(top, load_subsets(top))] == [("0.png", 3), ("1.png", 3)]


# ----------------------------------------------------------------------------- regularisation images

def test_reg_balancing_follows_kohya():
    def reg(n, repeats=1):
        return [ImageItem(Path(f"r{i}.png"), "girl", (32, 32), repeats, False, False, True) for i in range(n)]

    assert [i.num_repeats for i in balance_reg_repeats(9, reg(5))] == [2, 2, 2, 2, 1]
    assert [i.num_repeats for i in balance_reg_repeats(3, reg(5))] == [1, 1, 1, 0, 0]  # truncated
    assert [i.num_repeats for i in balance_reg_repeats(7, reg(2, 3))] == [4, 3]
    assert [i.num_repeats for i in balance_reg_repeats(0, reg(2))] == [0, 0]


def test_reg_folder_captions_and_interleaving_in_kohya_proportions(tmp_path):
    _images(tmp_path / "train" / "3_tok1", 3, ["tok1, 1girl, smile"])
    _images(tmp_path / "reg" / "1_1girl", 5)
    (tmp_path / "reg" / "1_1girl" / "0.txt").write_text("1girl, solo, outdoors")
    config = build_config({"train_data_dir": str(tmp_path / "train"), "reg_data_dir": str(tmp_path / "reg"),
                           "resolution": 32, "shuffle_caption": True})
    items = scan_images(config, load_subsets(config))
    reg = [i for i in items if i.is_reg]
    assert [i.caption for i in reg] == ["1girl, solo, outdoors"] + ["1girl"] * 4  # folder class for uncaptioned images
    entries = build_entries(items)
    order = SampleOrder([items[i].bucket for i in entries], global_batch=2, seed=0, stage_index=0)
    for epoch in range(2):
        seen = Counter(items[entries[e]].is_reg for batch in order.epoch(epoch) for e in batch)
        assert seen == {False: 9, True: 9}  # 3 images x 3 repeats, and the 5 reg images balanced to 9 entries
    mixed = [draw_sample(items, entries, order, 0, 0, step, slot, "tok1", 1) for step in range(9) for slot in range(2)]
    assert {items[s.item_index].is_reg for s in mixed} == {True, False}
    assert all(s.caption.count("tok1") == (0 if items[s.item_index].is_reg else 1) for s in mixed)
    assert tag_frequency(items)["1_1girl"] == {"1girl": 5, "solo": 1, "outdoors": 1}


@register_plugin
class RecordingPlugin(Plugin):
    """Records what each micro-step was fed and checks the main loss's reg weighting."""

    name = "test_kohya_recording"
    records: list = []

    def extra_losses(self, state, batch, main, rows):
        mse = ((main.prediction.float() - main.target.float()) ** 2).mean(dim=(1, 2, 3)).detach()
        RecordingPlugin.records.append({"step": state.stage_step, "captions": list(batch.captions),
                                        "is_reg": list(batch.is_reg), "mse": mse})
        return {}

    def on_step_end(self, state, logs):
        RecordingPlugin.records[-1]["main"] = logs["loss/main"]


def test_training_feeds_what_the_preview_shows_and_weights_reg_loss(tiny_model, tmp_path, capsys):
    _images(tmp_path / "train" / "2_tok1", 2, ["1girl, tok1, red hair, smile;;;happy", "tok1, 1girl, {hat|cap}"])
    _images(tmp_path / "reg" / "1_girl", 3)
    raw = {
        "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tmp_path / "train"),
        "reg_data_dir": str(tmp_path / "reg"), "prior_loss_weight": 0.25, "resolution": 32, "train_batch_size": 2,
        "output_dir": str(tmp_path / "out"), "network_dim": 4, "network_alpha": 4.0, "shuffle_caption": True,
        "caption_tag_dropout_rate": 0.3, "enable_wildcard": True, "secondary_separator": ";;;", "flip_aug": True,
        "color_aug": True, "seed": 7, "plugins": {"test_kohya_recording": {}},
        "stages": [{"name": "inversion", "kind": "inversion", "steps": 4, "learning_rate": 5e-2}],
    }
    RecordingPlugin.records = []
    Trainer(build_config(raw)).run()
    records = RecordingPlugin.records
    assert len(records) == 4
    fed = [c for r in records for c in r["captions"]]
    preview = preview_dataset(build_config(raw), n=8)
    assert [s.caption for s in preview.samples] == fed
    assert [s.is_reg for s in preview.samples] == [r for rec in records for r in rec["is_reg"]]
    assert any(s.is_reg for s in preview.samples) and not all(s.is_reg for s in preview.samples)
    for record in records:
        weights = torch.tensor([0.25 if r else 1.0 for r in record["is_reg"]])
        assert record["main"] == pytest.approx(float((record["mse"] * weights).mean()), rel=1e-5)
    assert preview_main(["--preset", _write_preset(tmp_path, raw), "--n", "8"]) == 0
    printed = capsys.readouterr().out
    assert all(caption in printed for caption in fed)
    assert "1_girl: girl (3)" in printed and "entries per epoch: 4 training + 4 regularisation" in printed
    assert preview_main(["--preset", _write_preset(tmp_path, raw), "--shuffle_captions", "true"]) == 2


def test_the_preview_runs_on_a_machine_without_a_gpu_with_a_preset_asking_for_fp16(tiny_model, tmp_path, capsys, monkeypatch):
    """It loads no model, so the shipped presets' mixed_precision = "fp16" (a CUDA-only setting, refused for
    training on a CPU) must not stop it."""
    import pti_plugin.choices as choices

    monkeypatch.setattr(choices, "cuda_available", lambda: False)
    _images(tmp_path / "train" / "2_tok1", 2, ["tok1, red hair", "tok1, smile"])
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tmp_path / "train"), "resolution": 32,
           "output_dir": str(tmp_path / "out"), "mixed_precision": "fp16"}
    assert preview_main(["--preset", _write_preset(tmp_path, raw), "--n", "2"]) == 0
    printed = capsys.readouterr().out
    assert "tok1, red hair" in printed or "tok1, smile" in printed



def test_the_preview_refuses_precision_keys_that_contradict_each_other_as_training_does(tiny_model, tmp_path, capsys,
                                                                                         monkeypatch):
    """It skips only the question whether this machine can train in the precision: full_bf16 without
    mixed_precision = "bf16" is the preset's own error, named before a run would meet it."""
    import pti_plugin.choices as choices

    monkeypatch.setattr(choices, "cuda_available", lambda: False)
    _images(tmp_path / "train" / "2_tok1", 2, ["tok1, red hair", "tok1, smile"])
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tmp_path / "train"), "resolution": 32,
           "output_dir": str(tmp_path / "out"), "mixed_precision": "fp16", "full_bf16": True}
    assert preview_main(["--preset", _write_preset(tmp_path, raw), "--n", "2"]) != 0
    assert "key 'full_bf16' = true needs mixed_precision = \"bf16\"" in capsys.readouterr().err


def test_debug_dataset_shows_the_dataset_through_train_pti_and_trains_nothing(tiny_model, tmp_path, capsys):
    """kohya's debug_dataset shows the dataset instead of training: train_pti.py runs the preview with its arguments."""
    from pti_plugin.cli import main as train_main

    _images(tmp_path / "train" / "2_tok1", 2, ["tok1, red hair", "tok1, smile"])
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tmp_path / "train"), "resolution": 32,
           "output_dir": str(tmp_path / "out")}
    preset = _write_preset(tmp_path, raw)
    assert preview_main(["--preset", preset]) == 0
    expected = capsys.readouterr().out
    assert train_main(["--preset", preset, "--debug_dataset"]) == 0
    assert capsys.readouterr().out == expected and "tok1, red hair" in expected
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

@pytest.mark.parametrize("flags, message", [
    (["--tags", "-1"], "--tags must be >= 0"),
    (["--save_images", "{file}"], "--save_images {file}: exists and is not a folder"),
    (["--save_images", "{file}/sub"], "--save_images {file}/sub: cannot be created: {file} is a file, not a folder"),
])
def test_the_previews_own_flags_are_named_when_wrong(tiny_model, tmp_path, capsys, flags, message):
    _images(tmp_path / "train" / "2_tok1", 1, ["tok1, red hair"])
    file = tmp_path / "notes.txt"
    file.write_text("x")
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tmp_path / "train"), "resolution": 32,
           "output_dir": str(tmp_path / "out")}
    argv = ["--preset", _write_preset(tmp_path, raw)] + [f.format(file=file) for f in flags]
    assert preview_main(argv) == 2
    assert message.format(file=file) in capsys.readouterr().err


def _write_preset(tmp_path: Path, raw: dict) -> str:
    import toml

    path = tmp_path / "preset.toml"
    path.write_text(toml.dumps({k: v for k, v in raw.items() if k != "plugins"}))
    return str(path)


def test_captions_under_another_extension_are_pointed_out(tmp_path, caplog):
    """caption_extension = ".caption" beside .txt captions: every image silently took the template; now a warning
    names the files and the setting (and none when the captions are found)."""
    _images(tmp_path / "a", 2, captions=["tok1, red hair"])
    (tmp_path / "dataset.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\ncaption_extension = '.caption'\n")
    config = build_config({"dataset_config": str(tmp_path / "dataset.toml"), "resolution": 32})
    with caplog.at_level(logging.WARNING):
        items = scan_images(config, load_subsets(config))
    assert [i.caption for i in items] == ["an anime illustration of tok1"] * 2
    assert "no .caption caption file beside the 2 image(s)" in caplog.text and "set caption_extension = '.txt'" in caplog.text
    caplog.clear()
    (tmp_path / "dataset.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    with caplog.at_level(logging.WARNING):
        scan_images(config := build_config({"dataset_config": str(tmp_path / "dataset.toml"), "resolution": 32}), load_subsets(config))
    assert "caption file beside" not in caplog.text
