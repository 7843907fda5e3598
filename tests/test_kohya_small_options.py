"""kohya's vae_batch_size, log_prefix, log_tracker_name, log_tracker_config and metadata_thumbnail.

The expectations are kohya sd-scripts' own, written out here: ``train_util.cache_latents`` (images of one bucket
resolution encoded ``vae_batch_size`` at a time), ``train_util.prepare_accelerator`` (the tracker logs into
``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>``) and ``init_trackers`` (``log_tracker_name`` the project, accelerate's
TensorBoard sub-folder; ``log_tracker_config`` a TOML of init arguments by tracker), ``sai_model_spec.file_to_data_url``
(``modelspec.thumbnail = "data:<mime>;base64,<file bytes>"``).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re

import pytest
import torch
from safetensors import safe_open

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.latents import LatentSource
from pti_plugin.data.scanning import scan_images
from pti_plugin.kohya_options import REFUSED_OPTIONS
from pti_plugin.trainer import Trainer

from .conftest import draw_character


def _items(folder):
    config = build_config({"train_data_dir": str(folder), "resolution": 32})
    return scan_images(config, load_subsets(config))


def _counting_vae(tiny_model):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    calls = []
    encode = vae.encode

    def counted(pixels, *args, **kwargs):
        calls.append(tuple(pixels.shape))
        return encode(pixels, *args, **kwargs)

    vae.encode = counted
    return vae, calls


def test_vae_batch_size_encodes_each_bucket_in_batches_equal_to_one_by_one(tiny_model, tiny_dataset):
    items = _items(tiny_dataset)
    # two buckets: images 0, 1 at 64x32 (flipped too), 2, 3 at 32x32; 6 draws in all
    items = [dataclasses.replace(item, bucket=(64, 32), flip_aug=True) if i < 2 else item for i, item in enumerate(items)]
    vae, calls = _counting_vae(tiny_model)
    one = LatentSource(vae, items, seed=5, cache=True, to_disk=False)  # the default: one image at a time
    one.fill_cache()
    assert len(calls) == 6
    draws = [(0, False), (0, True), (1, False), (1, True), (2, False), (3, False)]
    for batch, expected in ((4, [(4, 3, 32, 64), (2, 3, 32, 32)]), (3, [(3, 3, 32, 64), (1, 3, 32, 64), (2, 3, 32, 32)])):
        calls.clear()
        batched = LatentSource(vae, items, seed=5, cache=True, to_disk=False, batch_size=batch)
        batched.fill_cache()
        assert sorted(calls) == sorted(expected)  # ceil(4/4) + ceil(2/4) calls, ceil(4/3) + ceil(2/3)
        assert len(calls) == math.ceil(4 / batch) + math.ceil(2 / batch)
        for index, flip in draws:  # each image's own posterior draw: equal to one-by-one within 1e-4 (README)
            torch.testing.assert_close(batched.latent(index, flip), one.latent(index, flip), atol=1e-4, rtol=0)
        # the images differ, so do their latents (no draw is shared across a batch)
        assert not torch.allclose(batched.latent(2, False), batched.latent(3, False))


def test_vae_batch_size_is_checked_and_accepted(tmp_path):
    assert "vae_batch_size" not in REFUSED_OPTIONS
    assert build_config({"train_data_dir": str(tmp_path), "vae_batch_size": 4}).vae_batch_size == 4
    with pytest.raises(ConfigError, match="key 'vae_batch_size' must be > 0, got 0"):
        build_config({"train_data_dir": str(tmp_path), "vae_batch_size": 0})


def test_log_prefix_tracker_name_config_and_thumbnail_in_a_run(preset, tmp_path):
    thumb = tmp_path / "thumb.png"
    draw_character(thumb, 2)
    tracker_toml = tmp_path / "trackers.toml"
    tracker_toml.write_text('[tensorboard]\nfilename_suffix = ".mine"\nflush_secs = 5\n')
    raw = preset(log_with="tensorboard", logging_dir=str(tmp_path / "tb"), log_prefix="run-",
                 log_tracker_name="my_project", log_tracker_config=str(tracker_toml), metadata_thumbnail=str(thumb),
                 stages=[{"kind": "inversion", "steps": 1, "learning_rate": 1e-2},
                         {"kind": "lora", "steps": 1, "learning_rate": 1e-2}])
    Trainer(build_config(raw)).run()
    runs = list((tmp_path / "tb").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"run-\d{14}", runs[0].name)  # <logging_dir>/<prefix><YYYYmmddHHMMSS>
    events = list((runs[0] / "my_project").glob("events.out.tfevents.*"))
    assert events and all(e.name.endswith(".mine") for e in events)  # SummaryWriter got filename_suffix
    url = f"data:image/png;base64,{base64.b64encode(thumb.read_bytes()).decode('ascii')}"
    for name in ("pti.safetensors", "tok1.safetensors"):
        with safe_open(str(tmp_path / "out" / name), framework="pt") as handle:
            value = handle.metadata()["modelspec.thumbnail"]
        assert value == url
        assert base64.b64decode(value.split(",", 1)[1]) == thumb.read_bytes()


def test_without_log_prefix_the_tracker_keeps_its_folder(preset, tmp_path):
    from pti_plugin.tracking import tracker_logging_dir, tracker_name

    config = build_config(preset(log_with="tensorboard", logging_dir=str(tmp_path / "tb")))
    assert tracker_logging_dir(config, tmp_path / "out") == (tmp_path / "tb").resolve() and tracker_name(config) == "pti"
    named = build_config(preset(log_with="tensorboard", log_prefix="x_", log_tracker_name="proj"))
    assert tracker_logging_dir(named, tmp_path / "out", now=0.0).parent == tmp_path / "out" / "logs"
    assert tracker_name(named) == "proj"


def test_a_data_url_thumbnail_is_written_as_given():
    from pti_plugin.formats.model_spec import model_spec_metadata, thumbnail_data_url

    url = "data:image/jpeg;base64,/9j/AAAA"
    assert thumbnail_data_url(url) == url
    meta = model_spec_metadata("lora", "sd15", "t", 512, 0.0, {"thumbnail": url})
    assert meta["modelspec.thumbnail"] == url


@pytest.mark.parametrize("extra, files, message", [
    ({"metadata_thumbnail": "missing.png"}, {}, "key 'metadata_thumbnail': cannot read the thumbnail image"),
    ({"metadata_thumbnail": "notes.png"}, {"notes.png": "not an image"}, "notes.png is not a readable image"),
    ({"log_tracker_config": "t.toml", "log_with": "tensorboard"}, {"t.toml": '[wandb]\nname = "x"\n'},
     "configures tracker 'wandb', which pti-plugin does not support"),
    ({"log_tracker_config": "t.toml", "log_with": "tensorboard"}, {"t.toml": "[tensorboard]\nflush_sec = 3\n"},
     "[tensorboard] has 'flush_sec', not arguments of SummaryWriter"),
    ({"log_tracker_config": "t.toml", "log_with": "tensorboard"}, {"t.toml": "[tensorboard\n"}, "t.toml is not valid TOML"),
    ({"log_tracker_config": "missing.toml", "log_with": "tensorboard"}, {}, "key 'log_tracker_config': file not found"),
    ({"log_prefix": "run-"}, {}, "key 'log_prefix' = 'run-' needs a tracker"),
    ({"log_tracker_name": "a/b", "log_with": "tensorboard"}, {}, "must be a plain folder name"),
])
def test_bad_values_are_refused_at_start_naming_the_key(preset, tmp_path, extra, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    extra = {k: str(tmp_path / v) if k in ("metadata_thumbnail", "log_tracker_config") else v for k, v in extra.items()}
    with pytest.raises(ConfigError) as caught:
        build_config(preset(**extra))
    key = next(k for k in extra if k != "log_with")
    assert message in str(caught.value) and caught.value.key == key
