"""kohya's dataset, bucket, epoch and session keys in the LoRA's metadata.

The expectations are written out by hand from kohya sd-scripts' ``train_network.py`` (its ``metadata = {...}``, then
``ss_datasets`` with a ``dataset_config`` or the flat keys for folders, all written ``str(v)``, the ``{...}`` ones
``json.dumps``) and ``library/train_util.py``: ``num_train_images`` = images x repeats, ``num_reg_images`` = reg images
x their folder's repeats (before the balancing), ``bucket_info`` = the buckets in use sorted by (w, h), numbered from 0,
counting images x repeats (reg images with their balanced repeats), and ``mean_img_ar_error`` = the mean of
``|bucket w/h - image w/h|`` over the images; ``args.resolution`` is a tuple (``"(128, 64)"``); the dataloader's
length is the sum over buckets of ``ceil(entries / batch size)``; ``ss_epoch`` is the loop's 0-based epoch at a
step save and ``num_train_epochs`` at the final save.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _image(path: Path, size: tuple[int, int], caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def _raw(model: Path, out: Path, **overrides) -> dict:
    return {"pretrained_model_name_or_path": str(model), "output_dir": str(out), "network_dim": 4, "network_alpha": 4.0,
            "log_every_n_steps": 100, "stages": [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2},
                                                  {"kind": "lora", "steps": 6, "learning_rate": 1e-2}]} | overrides


@pytest.fixture(scope="module")
def folder_run(tiny_sdxl, tmp_path_factory) -> Path:
    """``1_tok1``: 64x64, 128x64, 40x64; ``2_person`` (reg): one 64x64. Buckets of resolution [128, 64], 64..128
    step 64: (64, 64), (64, 128), (128, 64); the 40x64 image (w/h 0.625) goes to (64, 128) (w/h 0.5). Entries: 3
    training, the reg image (2 repeats) balanced to 3: buckets of 4, 1, 1 entries, batch 8: 1 + 1 + 1 = 3 batches an
    epoch; the lora stage's 4 steps are ceil(4 / 3) = 2 epochs; save_every_n_steps = 3 saves at global step 3, lora
    step 2 (epoch index 0). The tiny SDXL model keeps the run short (kohya's train_network.py writes these keys for
    both families): its first attention is a level below the latent's size, a 128x64 image's 512 tokens, where the
    tiny SD1.5 UNet's are the latent's 2048 (the tiny VAE only halves the size)."""
    root = tmp_path_factory.mktemp("folders")
    for name, size in (("a", (64, 64)), ("b", (128, 64)), ("c", (40, 64))):
        _image(root / "data" / "1_tok1" / f"{name}.png", size, "tok1, red")
    _image(root / "reg" / "2_person" / "r.png", (64, 64))
    raw = _raw(tiny_sdxl, root / "out", train_data_dir=str(root / "data"), reg_data_dir=str(root / "reg"),
               resolution=[128, 64], enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128, train_batch_size=8,
               keep_tokens=1, shuffle_caption=True, flip_aug=True, resize_interpolation="bicubic", save_every_n_steps=3,
               stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 4, "learning_rate": 1e-2}])
    Trainer(build_config(raw)).run()
    return root / "out"


#: kohya's flat keys for the folder run, written out.
FLAT = {
    "ss_num_train_images": "3", "ss_num_reg_images": "2", "ss_num_batches_per_epoch": "3",
    "ss_batch_size_per_device": "8", "ss_total_batch_size": "8", "ss_resolution": "(128, 64)",
    "ss_enable_bucket": "True", "ss_bucket_no_upscale": "False", "ss_min_bucket_reso": "64",
    "ss_max_bucket_reso": "128", "ss_keep_tokens": "1", "ss_shuffle_caption": "True", "ss_flip_aug": "True",
    "ss_color_aug": "False", "ss_random_crop": "False", "ss_face_crop_aug_range": "None",
    "ss_resize_interpolation": "bicubic", "ss_v2": "False", "ss_lowram": "False",
    "ss_dataset_dirs": '{"1_tok1": {"n_repeats": 1, "img_count": 3}}',
    "ss_reg_dataset_dirs": '{"2_person": {"n_repeats": 2, "img_count": 1}}',
    "ss_bucket_info": '{"buckets": {"0": {"resolution": [64, 64], "count": 4}, "1": {"resolution": [64, 128], '
                      '"count": 1}, "2": {"resolution": [128, 64], "count": 1}}, "mean_img_ar_error": 0.03125}',
    "ss_num_epochs": "2", "ss_epoch": "2",
}


def test_a_folder_run_writes_kohyas_flat_dataset_and_bucket_keys(folder_run):
    meta = _metadata(folder_run / "pti.safetensors")
    assert {k: meta.get(k) for k in FLAT} == FLAT
    assert "ss_datasets" not in meta


def test_the_session_and_epoch_keys_of_a_step_save_and_the_final_save(folder_run):
    step, final = _metadata(folder_run / "pti-step00000003.safetensors"), _metadata(folder_run / "pti.safetensors")
    assert (step["ss_steps"], step["ss_epoch"], step["ss_num_epochs"]) == ("3", "0", "2")
    assert (final["ss_steps"], final["ss_epoch"]) == ("5", "2")
    assert step["ss_session_id"] == final["ss_session_id"] and 0 <= int(final["ss_session_id"]) <= 2**32
    assert step["ss_training_started_at"] == final["ss_training_started_at"]  # the run's start, once
    started = float(final["ss_training_started_at"])
    assert started <= float(step["ss_training_finished_at"]) <= float(final["ss_training_finished_at"])


def test_a_second_run_gets_another_session_id(folder_run, tiny_model, tmp_path):
    data = folder_run.parent / "data"
    Trainer(build_config(_raw(tiny_model, tmp_path / "out", train_data_dir=str(data), resolution=32,
                              train_batch_size=8, stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]))).run()
    meta = _metadata(tmp_path / "out" / "pti.safetensors")
    assert meta["ss_session_id"] != _metadata(folder_run / "pti.safetensors")["ss_session_id"]
    # without buckets: kohya's dataset holds no range and no bucket info
    assert {k: meta[k] for k in ("ss_enable_bucket", "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_no_upscale",
                                 "ss_bucket_info", "ss_resolution", "ss_reg_dataset_dirs", "ss_epoch")} == {
        "ss_enable_bucket": "False", "ss_min_bucket_reso": "None", "ss_max_bucket_reso": "None",
        "ss_bucket_no_upscale": "False", "ss_bucket_info": "null", "ss_resolution": "(32, 32)",
        "ss_reg_dataset_dirs": "{}", "ss_epoch": "1"}


def _subset(image_dir: str, repeats: int, **more) -> dict:
    return {"img_count": 2 if image_dir == "imgs" else 1, "num_repeats": repeats, "color_aug": False,
            "flip_aug": False, "random_crop": False, "shuffle_caption": False, "keep_tokens": 0,
            "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "caption_prefix": None,
            "caption_suffix": None, "resize_interpolation": None, "image_dir": image_dir, "class_tokens": None,
            "is_reg": False} | more


def test_a_dataset_config_of_two_datasets_writes_ss_datasets(tiny_model, tmp_path):
    """Dataset 0: ``imgs`` (2 images) x 2. Dataset 1: ``imgs`` again x 1 with flip_aug, and ``reg`` (1 image, class
    ``person``), balanced to the 2 training entries. The folder used twice is ``imgs (2)`` the second time in
    ``ss_dataset_dirs``, which leaves the reg subset out; each dataset has its own tag frequency."""
    for i in range(2):
        _image(tmp_path / "imgs" / f"{i}.png", (32, 32), "tok1, red square")
    _image(tmp_path / "reg" / "r.png", (32, 32))
    (tmp_path / "data.toml").write_text(
        "[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = 'imgs'\nnum_repeats = 2\n"
        "[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = 'imgs'\nflip_aug = true\n"
        "[[datasets.subsets]]\nimage_dir = 'reg'\nis_reg = true\nclass_tokens = 'person'\n")
    Trainer(build_config(_raw(tiny_model, tmp_path / "out", dataset_config=str(tmp_path / "data.toml"),
                              train_batch_size=2, stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]))).run()
    meta = _metadata(tmp_path / "out" / "pti.safetensors")
    imgs = {"tok1": 2, "red square": 2}
    common = {"is_dreambooth": True, "batch_size_per_device": 2}
    no_buckets = {"resolution": [32, 32], "enable_bucket": False, "min_bucket_reso": None, "max_bucket_reso": None}
    expected = [
        common | {"num_train_images": 4, "num_reg_images": 0} | no_buckets | {
            "tag_frequency": {"imgs": imgs}, "bucket_info": None, "resize_interpolation": None,
            "subsets": [_subset("imgs", 2)]},
        common | {"num_train_images": 2, "num_reg_images": 1} | no_buckets | {
            "tag_frequency": {"imgs": imgs, "reg": {"person": 1}}, "bucket_info": None, "resize_interpolation": None,
            "subsets": [_subset("imgs", 1, flip_aug=True), _subset("reg", 1, class_tokens="person", is_reg=True)]},
    ]
    assert meta["ss_datasets"] == json.dumps(expected)
    assert meta["ss_dataset_dirs"] == '{"imgs": {"n_repeats": 2, "img_count": 2}, "imgs (2)": {"n_repeats": 1, "img_count": 2}}'
    assert json.loads(meta["ss_tag_frequency"]) == {"imgs": imgs, "reg": {"person": 1}}
    # 4 + 2 training entries, 2 reg (balanced): batches of 2 in the one 32x32 bucket: 4 an epoch
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_num_batches_per_epoch"]) == ("6", "1", "4")
    # kohya's dataset_config form has no flat dataset keys
    assert not {"ss_resolution", "ss_enable_bucket", "ss_bucket_info", "ss_reg_dataset_dirs", "ss_batch_size_per_device",
                "ss_total_batch_size", "ss_keep_tokens", "ss_flip_aug"} & meta.keys()


def test_an_sdxl_run_writes_the_same_keys(tiny_sdxl, tmp_path):
    _image(tmp_path / "data" / "1_tok1" / "a.png", (64, 64), "tok1")
    Trainer(build_config(_raw(tiny_sdxl, tmp_path / "out", train_data_dir=str(tmp_path / "data"), resolution=64,
                              train_batch_size=1, stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]))).run()
    meta = _metadata(tmp_path / "out" / "pti.safetensors")
    assert {k: meta.get(k) for k in ("ss_base_model_version", "ss_v2", "ss_resolution", "ss_num_train_images",
                                     "ss_dataset_dirs", "ss_num_epochs", "ss_epoch", "ss_text_encoder_lr")} == {
        "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_resolution": "(64, 64)",
        "ss_num_train_images": "1", "ss_dataset_dirs": '{"1_tok1": {"n_repeats": 1, "img_count": 1}}',
        "ss_num_epochs": "1", "ss_epoch": "1", "ss_text_encoder_lr": "None"}


def test_no_metadata_keeps_ss_v2_of_kohyas_minimum_keys(tiny_model, tiny_dataset, tmp_path):
    Trainer(build_config(_raw(tiny_model, tmp_path / "out", train_data_dir=str(tiny_dataset), resolution=32,
                              no_metadata=True, stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]))).run()
    meta = _metadata(tmp_path / "out" / "pti.safetensors")
    assert {k: v for k, v in meta.items() if k.startswith("ss_")} == {
        "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
        "ss_network_dim": "4", "ss_network_alpha": "4.0"}


@pytest.mark.parametrize("every, stage_index, stage_step, final, epoch", [
    (None, 0, 2, False, "0"),  # a save in the inversion stage, before the lora stage: no lora epoch yet
    (None, 1, 3, False, "0"),  # a step save in the first epoch: kohya's 0-based epoch index
    (None, 1, 4, False, "0"),  # the first epoch's last step, a step save: still kohya's loop index 0
    (1, 1, 4, False, "1"),     # the same step a saving epoch's end: kohya's epoch save writes epoch + 1
    (None, 1, 5, False, "1"),
    (None, 1, 6, True, "2"),   # the final save: num_train_epochs = ceil(6 / 4)
])
def test_ss_epoch_follows_kohyas_saves_in_the_lora_stage(tiny_model, tiny_dataset, every, stage_index, stage_step,
                                                         final, epoch):
    from pti_plugin.save_schedule import epoch_metadata

    saves = {"save_every_n_epochs": every} if every else {}
    config = build_config(_raw(tiny_model, Path("out"), train_data_dir=str(tiny_dataset), **saves,
                               stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2},
                                       {"kind": "lora", "steps": 6, "learning_rate": 1e-2}]))
    assert epoch_metadata(config, 4, stage_index, stage_step, final) == {"ss_num_epochs": "2", "ss_epoch": epoch}
