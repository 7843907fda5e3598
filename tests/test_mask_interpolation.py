"""Loss masks follow kohya's ``resize_interpolation``: an alpha mask is resized with its image's filter (kohya resizes
the RGBA image, then takes its alpha), a ``conditioning_data_dir`` mask with its dataset's filter (kohya's
ControlNet-style dataset resizes the conditioning image with the dataset's ``resize_interpolation``, never a
subset's own); unset, Lanczos as before.

Every expectation is PIL's own resize of the noise written into the alpha channel / mask file, computed here: a
48x40 image in a 32x32 bucket is scaled by 0.8 to 38x32 and its centre 32 columns kept (columns 3 to 34).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.data.augment import Augmentation, augmented_pixels
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.masks import fitted_mask, pixels_and_mask
from pti_plugin.data.scanning import scan_images
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import Trainer

R = Image.Resampling
RESIZED, LEFT = (38, 32), 3  # 48x40 scaled by 32/40 = 0.8: 38.4 -> 38 wide; (38 - 32) // 2 = 3


def _noise(seed: int) -> np.ndarray:
    """uint8 [40, 48] noise: every filter gives other values from it."""
    return np.random.default_rng(seed).integers(0, 256, (40, 48), dtype=np.uint8)


def _rgba_image(path: Path) -> np.ndarray:
    """A 48x40 RGBA image of noise, its alpha returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    alpha = _noise(1)
    Image.fromarray(np.dstack([_noise(2), _noise(3), _noise(4), alpha])).save(path)
    return alpha


def _mask_file(path: Path) -> np.ndarray:
    """A 48x40 RGB mask file: noise in its red channel (returned), other noise in green and blue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    red = _noise(5)
    Image.fromarray(np.dstack([red, _noise(6), _noise(7)])).save(path)
    return red


def _expected(channel: np.ndarray, pil_filter: Image.Resampling) -> torch.Tensor:
    """The 32x32 mask, [0, 1]: the channel resized to 38x32 with ``pil_filter``, columns 3 to 34."""
    resized = np.asarray(Image.fromarray(channel).resize(RESIZED, pil_filter))[:, LEFT:LEFT + 32]
    return torch.from_numpy(resized.astype(np.float32) / 255.0)


def _alpha_config(tmp_path: Path, interpolation: str | None) -> dict:
    options = {"train_data_dir": str(tmp_path / "data"), "resolution": 32, "alpha_mask": True}
    return options | ({"resize_interpolation": interpolation} if interpolation else {})


@pytest.mark.parametrize("interpolation, pil_filter", [("nearest", R.NEAREST), ("bicubic", R.BICUBIC),
                                                        ("area", R.HAMMING), (None, R.LANCZOS)])
def test_an_alpha_mask_is_resized_with_its_images_filter(tmp_path, interpolation, pil_filter):
    alpha = _rgba_image(tmp_path / "data" / "2_tok1" / "a.png")
    config = build_config(_alpha_config(tmp_path, interpolation))
    (item,) = scan_images(config, load_subsets(config))
    expected = _expected(alpha, pil_filter)
    if pil_filter != R.LANCZOS:
        assert not torch.equal(expected, _expected(alpha, R.LANCZOS))  # the noise tells the filters apart
    for flip in (False, True):
        want = expected.flip(-1) if flip else expected
        assert torch.equal(fitted_mask(item, Augmentation(flip=flip)), want)
        assert torch.equal(pixels_and_mask(item, Augmentation(flip=flip))[1], want)  # the training loader's path


def _masked_toml(tmp_path: Path, general: str, dataset: str, subset: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(f"[general]\n{general}\n[[datasets]]\nresolution = 32\n{dataset}\n[[datasets.subsets]]\n"
                    f"image_dir = 'data/2_tok1'\nconditioning_data_dir = 'masks'\n{subset}\n")
    return path


@pytest.mark.parametrize("preset_key, general, dataset, subset, mask_filter, image_filter", [
    (None, "", "resize_interpolation = 'nearest'", "", R.NEAREST, R.NEAREST),
    # kohya: the subset's own filter resizes its images, the dataset's its conditioning masks
    (None, "", "resize_interpolation = 'nearest'", "resize_interpolation = 'bilinear'", R.NEAREST, R.BILINEAR),
    (None, "resize_interpolation = 'box'", "", "", R.BOX, R.BOX),
    ("bicubic", "", "", "", R.BICUBIC, R.BICUBIC),
    (None, "", "", "resize_interpolation = 'nearest'", R.LANCZOS, R.NEAREST),
    (None, "", "", "", R.LANCZOS, R.LANCZOS),
])
def test_a_mask_file_is_resized_with_its_datasets_filter(tmp_path, preset_key, general, dataset, subset, mask_filter,
                                                         image_filter):
    _rgba_image(tmp_path / "data" / "2_tok1" / "a.png")
    red = _mask_file(tmp_path / "masks" / "a.png")
    options = {"dataset_config": str(_masked_toml(tmp_path, general, dataset, subset)), "masked_loss": True}
    config = build_config(options | ({"resize_interpolation": preset_key} if preset_key else {}))
    (item,) = scan_images(config, load_subsets(config))
    assert item.mask_path == tmp_path / "masks" / "a.png"
    assert torch.equal(fitted_mask(item, Augmentation()), _expected(red, mask_filter))
    assert torch.equal(pixels_and_mask(item, Augmentation(flip=True))[1], _expected(red, mask_filter).flip(-1))
    image = Image.open(tmp_path / "data" / "2_tok1" / "a.png").convert("RGBA")
    white = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    pixels = np.asarray(white.resize(RESIZED, image_filter))[:, LEFT:LEFT + 32]
    assert torch.equal(augmented_pixels(item, Augmentation()), torch.from_numpy(pixels.copy()).permute(2, 0, 1) / 127.5 - 1)


@register_plugin
class RecordFilteredMasks(Plugin):
    """Records every micro-step's latents and loss masks."""

    name = "test_record_filtered_masks"
    records: list = []

    def extra_losses(self, state, batch, main, rows):
        RecordFilteredMasks.records.append((batch.latents.detach().clone(), batch.loss_masks.detach().clone()))
        return {}


def _block_means(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """kohya's area downsampling written out: the mean of each (32 / h) x (32 / w) block, [1, h, w]."""
    h, w = size
    array = mask.numpy().astype(np.float64).reshape(h, 32 // h, w, 32 // w).mean(axis=(1, 3))
    return torch.from_numpy(array.astype(np.float32))[None]


def test_training_and_its_disk_cache_use_the_filtered_mask(preset, tmp_path):
    alpha = _rgba_image(tmp_path / "data" / "2_tok1" / "a.png")
    stages = [{"name": "inversion", "kind": "inversion", "steps": 1, "learning_rate": 1e-2}]
    runs = []
    for cached in (False, True):
        RecordFilteredMasks.records = []
        raw = preset(stages=stages, plugins={"test_record_filtered_masks": {}}, overwrite=True, train_batch_size=1,
                     cache_latents_to_disk=cached, **_alpha_config(tmp_path, "nearest"))
        Trainer(build_config(raw)).run()
        (record,) = RecordFilteredMasks.records
        runs.append(record)
    (latents, mask), (cached_latents, cached_mask) = runs
    expected = _block_means(_expected(alpha, R.NEAREST), tuple(latents.shape[-2:]))
    assert torch.allclose(mask[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(cached_mask, mask) and torch.equal(cached_latents, latents)
    (file,) = (tmp_path / "data").rglob("*.pti_latents.safetensors")
    assert torch.allclose(load_file(str(file))["mask"], expected, atol=1e-6, rtol=0)


def test_a_cached_mask_is_not_reused_under_another_mask_filter(tiny_model, tmp_path):
    """Same image and image filter, the dataset's filter changed: the masks differ, so a new cache file is written,
    holding the new mask (a stale Lanczos mask is never served)."""
    from diffusers import AutoencoderKL

    from pti_plugin.data.latents import LatentSource

    _rgba_image(tmp_path / "data" / "2_tok1" / "a.png")
    red = _mask_file(tmp_path / "masks" / "a.png")
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    for dataset in ("", "resize_interpolation = 'nearest'"):
        toml = _masked_toml(tmp_path, "", dataset, "resize_interpolation = 'bilinear'")
        config = build_config({"dataset_config": str(toml), "masked_loss": True})
        source = LatentSource(vae, scan_images(config, load_subsets(config)), 0, cache=True, to_disk=True)
        source.fill_cache()
    files = list((tmp_path / "data").rglob("*.pti_latents.safetensors"))
    assert len(files) == 2
    size = tuple(source.latent(0, False).shape[-2:])
    newest = max(files, key=lambda f: f.stat().st_mtime_ns)
    expected = _block_means(_expected(red, R.NEAREST), size)
    assert torch.allclose(load_file(str(newest))["mask"], expected, atol=1e-6, rtol=0)
    assert torch.allclose(source.mask_for(0, Augmentation(), size), expected, atol=1e-6, rtol=0)


def test_the_preview_writes_the_mask_training_uses(tmp_path):
    from pti_plugin.dataset_preview import preview_dataset

    alpha = _rgba_image(tmp_path / "data" / "2_tok1" / "a.png")
    preview_dataset(build_config(_alpha_config(tmp_path, "nearest")), n=1, save_images=tmp_path / "out")
    written = np.asarray(Image.open(tmp_path / "out" / "step00000_slot000-mask.png"))
    assert np.array_equal(written, np.asarray(Image.fromarray(alpha).resize(RESIZED, R.NEAREST))[:, LEFT:LEFT + 32])
