"""kohya's masked loss: ``alpha_mask`` (the images' alpha channel) and ``masked_loss`` with a subset's
``conditioning_data_dir`` (the red channel of a mask file per image).

Expectations are built by hand: masks drawn as half-planes, the loss written out as kohya's plain product then the
mean over every element, flips and crops checked against the image's own pixels and latents.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pti_plugin.config import Config, ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.diffusion_loss import per_sample_loss
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import Trainer

from .conftest import draw_character


@register_plugin
class RecordMasks(Plugin):
    """Records every micro-step's latents, loss masks, prediction and target, and each step's logged main loss."""

    name = "test_record_masks"
    records: list = []
    losses: list = []

    def extra_losses(self, state, batch, main, rows):
        mask = None if batch.loss_masks is None else batch.loss_masks.detach().clone()
        RecordMasks.records.append({"latents": batch.latents.detach().clone(), "paths": list(batch.image_paths),
                                    "mask": mask, "prediction": main.prediction.detach().float().clone(),
                                    "target": main.target.detach().float().clone()})
        return {}

    def on_step_end(self, state, logs):
        RecordMasks.losses.append(logs["loss/main"])


def _folder(root: Path, alpha: np.ndarray | None, n: int = 4, repeats: int = 2) -> Path:
    """kohya layout ``root/<repeats>_tok1/{i}.png``: the conftest characters, with ``alpha`` (uint8 [32, 32]) as their
    alpha channel (RGB files when None)."""
    folder = root / f"{repeats}_tok1"
    folder.mkdir(parents=True)
    for i in range(n):
        draw_character(folder / f"{i}.png", 3 * i)
        if alpha is not None:
            image = Image.open(folder / f"{i}.png").convert("RGB")
            image.putalpha(Image.fromarray(alpha))
            image.save(folder / f"{i}.png")
    return root


def _left_clear() -> np.ndarray:
    """Alpha 0 on the left half (x < 16), 255 on the right."""
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, :16] = 0
    return alpha


def _run(preset, steps: int = 1, **options) -> tuple[list, list]:
    RecordMasks.records, RecordMasks.losses = [], []
    stages = [{"name": "inversion", "kind": "inversion", "steps": steps, "learning_rate": 1e-2}]
    Trainer(build_config(preset(stages=stages, plugins={"test_record_masks": {}}, overwrite=True, **options))).run()
    return RecordMasks.records, RecordMasks.losses


def _right_half_loss(record: dict) -> torch.Tensor:
    """kohya's masked l2 by hand: squared error on the opaque right half only, divided by every element."""
    d = record["prediction"] - record["target"]
    width = d.shape[-1]
    return (d[..., width // 2:] ** 2).sum(dim=(1, 2, 3)) / d[0].numel()


def _half_mask(shape: tuple[int, ...], zero_left: bool = True) -> torch.Tensor:
    mask = torch.ones(shape)
    half = shape[-1] // 2
    if zero_left:
        mask[..., :half] = 0
    else:
        mask[..., half:] = 0
    return mask


# ----------------------------------------------------------------------------- the loss


def test_the_mask_multiplies_each_element_then_every_element_counts_in_the_mean():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 6, 8, generator=generator), torch.randn(2, 4, 6, 8, generator=generator)
    pixel_mask = _half_mask((2, 48, 64))  # pixel-sized [b, H, W], 8x the latent: kohya's area downsampling
    expected = ((prediction - target)[..., 4:] ** 2).sum(dim=(1, 2, 3)) / (4 * 6 * 8)
    assert torch.allclose(per_sample_loss(prediction, target, None, None, Config(), pixel_mask), expected, rtol=1e-6)
    # a grey mask of 0.5 halves the loss; an all-ones mask changes nothing, bit for bit, in every loss_type
    half = per_sample_loss(prediction, target, None, None, Config(), torch.full((2, 1, 6, 8), 0.5))
    assert torch.allclose(half, ((prediction - target) ** 2).mean(dim=(1, 2, 3)) / 2, rtol=1e-6)
    timesteps = torch.tensor([10, 900])
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler(num_train_timesteps=1000)
    for loss_type in ("l2", "l1", "huber", "smooth_l1"):
        config = Config(loss_type=loss_type)
        plain = per_sample_loss(prediction, target, schedule, timesteps, config)
        assert torch.equal(per_sample_loss(prediction, target, schedule, timesteps, config, torch.ones(2, 1, 6, 8)), plain)


def test_alpha_zero_on_the_left_half_leaves_the_right_half_and_the_mask_flips_with_the_image(preset, tmp_path):
    data = _folder(tmp_path / "data", _left_clear(), repeats=1)
    (plain,), losses = _run(preset, train_data_dir=str(data), alpha_mask=True, train_batch_size=4)
    b, _, h, w = plain["latents"].shape
    assert torch.equal(plain["mask"], _half_mask((b, 1, h, w)))  # the tiny VAE halves the size: 16x16 latents
    assert losses[0] == pytest.approx(float(_right_half_loss(plain).mean()), rel=1e-6)
    assert losses[0] != pytest.approx(float(((plain["prediction"] - plain["target"]) ** 2).mean()), rel=1e-2)

    unflipped = dict(zip(plain["paths"], plain["latents"]))
    assert len(unflipped) == 4
    (record,), losses = _run(preset, train_data_dir=str(data), alpha_mask=True, flip_aug=True, train_batch_size=4)
    seen = set()
    for path, latent, mask in zip(record["paths"], record["latents"], record["mask"]):
        flipped = not torch.equal(latent, unflipped[path])  # the same image and seed: only a flip changes it
        seen.add(flipped)
        assert torch.equal(mask, _half_mask(tuple(mask.shape), zero_left=not flipped))
    assert seen == {False, True}
    masked = ((record["prediction"] - record["target"]) * record["mask"]) ** 2
    assert losses[0] == pytest.approx(float(masked.mean()), rel=1e-6)


def test_an_all_ones_alpha_trains_exactly_as_the_unmasked_run(preset, tmp_path):
    from safetensors.torch import load_file

    data = _folder(tmp_path / "data", np.full((32, 32), 255, np.uint8))
    runs = []
    for alpha_mask in (False, True):
        out = tmp_path / f"out_{alpha_mask}"
        records, losses = _run(preset, train_data_dir=str(data), alpha_mask=alpha_mask, output_dir=str(out), flip_aug=True)
        assert (records[0]["mask"] is None) != alpha_mask
        runs.append((losses, [load_file(str(f)) for f in sorted(out.glob("*.safetensors"))]))
    assert runs[0][0] == runs[1][0] and len(runs[0][1]) == len(runs[1][1]) > 0
    for off, on in zip(runs[0][1], runs[1][1]):
        assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)


# ----------------------------------------------------------------------------- masked_loss, conditioning_data_dir


def _masks_folder(root: Path, names: list[str], red: np.ndarray, size: tuple[int, int] = (32, 32)) -> Path:
    """Mask files: ``red`` (uint8 [h, w]) in the red channel, noise in green and blue (which must not count)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        rgb[..., 0] = red
        Image.fromarray(rgb).save(root / name)
    return root


def _dataset_toml(tmp_path: Path, subset: str, general: str = "") -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(f"[general]\n{general}\n[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = 'data/2_tok1'\n"
                    f"{subset}\n")
    return path


def test_masked_loss_reads_each_mask_files_red_channel_and_a_cached_run_equals_an_uncached_one(preset, tmp_path):
    _folder(tmp_path / "data", None)
    _masks_folder(tmp_path / "masks", [f"{i}.png" for i in range(4)], _left_clear())
    toml = _dataset_toml(tmp_path, "conditioning_data_dir = 'masks'\nflip_aug = true")
    options = {"train_data_dir": "", "dataset_config": str(toml), "masked_loss": True, "train_batch_size": 4}
    (record,), losses = _run(preset, **options)
    b, _, h, w = record["latents"].shape
    assert all(torch.equal(m, _half_mask((1, h, w), True)) or torch.equal(m, _half_mask((1, h, w), False))
               for m in record["mask"])
    assert losses[0] == pytest.approx(float((((record["prediction"] - record["target"]) * record["mask"]) ** 2).mean()),
                                      rel=1e-6)
    (cached,), cached_losses = _run(preset, **options, cache_latents_to_disk=True)
    assert cached_losses == losses  # bit for bit
    assert torch.equal(cached["mask"], record["mask"]) and torch.equal(cached["latents"], record["latents"])
    assert len(list((tmp_path / "data").rglob("*.pti_latents.safetensors"))) == 8  # 4 images x 2 flips, masks inside


def test_the_mask_is_cropped_with_the_image(tmp_path):
    """A 48x32 image in a 32x32 bucket with random_crop: the mask is cut at the image's offset (kohya centres it)."""
    from pti_plugin.data.augment import Augmentation, augmented_pixels
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.masks import fitted_mask
    from pti_plugin.data.scanning import scan_images

    ramp = np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1))  # brightness grows left to right
    (tmp_path / "data" / "2_tok1").mkdir(parents=True)
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(tmp_path / "data" / "2_tok1" / "a.png")
    _masks_folder(tmp_path / "masks", ["a.png"], ramp, size=(48, 32))
    toml = _dataset_toml(tmp_path, "conditioning_data_dir = 'masks'\nrandom_crop = true")
    config = build_config({"dataset_config": str(toml), "masked_loss": True})
    (item,) = scan_images(config, load_subsets(config))
    assert item.mask_path == tmp_path / "masks" / "a.png"
    for crop, flip in (((0.0, 0.0), False), ((0.99, 0.0), False), ((0.5, 0.0), True)):
        augmentation = Augmentation(flip=flip, crop=crop)
        pixels = augmented_pixels(item, augmentation)[0]  # the red channel in [-1, 1]
        assert torch.equal(fitted_mask(item, augmentation), ((pixels + 1) * 127.5).round() / 255.0)
    assert fitted_mask(item, Augmentation(crop=(0.99, 0.0)))[0, 0] == 16 * 5 / 255  # the crop's left edge: column 16


def test_the_disk_cache_key_follows_the_mask_file(tiny_model, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from pti_plugin.data.augment import Augmentation
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.latents import LatentSource
    from pti_plugin.data.scanning import scan_images

    _folder(tmp_path / "data", None, n=1)
    _masks_folder(tmp_path / "masks", ["0.png"], _left_clear())
    config = build_config({"dataset_config": str(_dataset_toml(tmp_path, "conditioning_data_dir = 'masks'")),
                           "masked_loss": True})
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    LatentSource(vae, scan_images(config, load_subsets(config)), 0, cache=True, to_disk=True).fill_cache()
    _masks_folder(tmp_path / "masks", ["0.png"], 255 - _left_clear())  # the mask is redrawn: right half clear
    items = scan_images(config, load_subsets(config))
    source = LatentSource(vae, items, 0, cache=True, to_disk=True)
    source.fill_cache()
    assert torch.equal(source.mask_for(0, Augmentation(), (16, 16)), _half_mask((1, 16, 16), zero_left=False))
    files = sorted((tmp_path / "data").rglob("*.pti_latents.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 2  # a new file beside the old one
    # the file holds the mask: a marker written into it is what the next run reads (the mask is not recomputed)
    save_file({"latent": source.latent(0, False), "mask": torch.full((1, 16, 16), 0.25)}, str(files[-1]))
    reread = LatentSource(vae, items, 0, cache=True, to_disk=True)
    reread.fill_cache()
    assert torch.equal(reread.mask_for(0, Augmentation(), (16, 16)), torch.full((1, 16, 16), 0.25))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("subset, general, options, expected", [
    ("", "alpha_mask = true", {}, "[general]: 'alpha_mask' belongs in a [[datasets.subsets]] table"),
    ("conditioning_data_dir = 'masks'", "", {}, "subsets.0: conditioning_data_dir holds loss masks, read only with "
                                                "masked_loss = true"),
    ("conditioning_data_dir = 'masks'\nalpha_mask = true", "", {"masked_loss": True},
     "conditioning_data_dir cannot be combined with alpha_mask = True"),
    ("conditioning_data_dir = 'nowhere'", "", {"masked_loss": True}, "conditioning_data_dir not found: looked for"),
    ("", "", {"masked_loss": True}, "key 'masked_loss' = true, but no subset has masks"),
    ("conditioning_data_dir = 'masks'\n[[datasets.subsets]]\nimage_dir = 'data/2_tok1'\nnum_repeats = 2", "",
     {"masked_loss": True}, "conditioning_data_dir is set in some subsets and not in others"),
])
def test_mask_keys_are_refused_by_name_in_their_file(tmp_path, subset, general, options, expected):
    _folder(tmp_path / "data", None)
    _masks_folder(tmp_path / "masks", [f"{i}.png" for i in range(4)], _left_clear())
    from pti_plugin.data.dataset import load_subsets

    config = build_config({"dataset_config": str(_dataset_toml(tmp_path, subset, general))} | options)
    with pytest.raises(ConfigError) as error:
        load_subsets(config)
    assert expected in str(error.value)
    if "masked_loss' =" not in expected:
        assert str(tmp_path / "dataset.toml") in str(error.value)


@pytest.mark.parametrize("names, size, expected", [
    (["0.png", "1.png", "2.png"], (32, 32), "has no mask for 1 image(s) (a mask is the file of the image's name"),
    (["0.png", "1.png", "2.png", "3.png", "9.png"], (32, 32), "has 1 mask file(s) named after no image of"),
    (["0.png", "1.png", "2.png", "3.png", "3.jpg"], (32, 32), "has 2 masks for 3.png (3.jpg, 3.png): keep one"),
    (["0.png", "1.png", "2.png", "3.png"], (32, 16), "mask 0.png is 32x16 while its image"),
])
def test_mask_files_are_checked_before_training(tmp_path, names, size, expected):
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.scanning import scan_images

    _folder(tmp_path / "data", None)
    _masks_folder(tmp_path / "masks", names, np.zeros((size[1], size[0]), np.uint8), size)
    toml = _dataset_toml(tmp_path, "conditioning_data_dir = 'masks'")
    config = build_config({"dataset_config": str(toml), "masked_loss": True})
    with pytest.raises(ConfigError) as error:
        scan_images(config, load_subsets(config))
    assert f"{toml} datasets.0.subsets.0: conditioning_data_dir {tmp_path / 'masks'}" in str(error.value)
    assert expected in str(error.value)


def test_alpha_mask_on_images_without_alpha_is_all_ones_with_a_warning(tmp_path, caplog):
    from pti_plugin.data.augment import Augmentation
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.masks import fitted_mask
    from pti_plugin.data.scanning import scan_images

    _folder(tmp_path / "data", None)
    config = build_config({"train_data_dir": str(tmp_path / "data"), "resolution": 32, "alpha_mask": True})
    with caplog.at_level(logging.WARNING):
        items = scan_images(config, load_subsets(config))
    assert "alpha_mask" in caplog.text and "4 image(s) have no alpha channel: their loss mask is all ones" in caplog.text
    assert "0.png" in caplog.text
    assert all(torch.equal(fitted_mask(i, Augmentation()), torch.ones(32, 32)) for i in items)
    with pytest.raises(ConfigError, match="conditioning_data_dir.*set it in a dataset_config subset, with masked_loss"):
        build_config({"train_data_dir": str(tmp_path / "data"), "conditioning_data_dir": "masks"})
