"""``dataset_preview --save_images``: beside each sample's image, its loss mask as training fits it (bucket resize,
crop, flip) when ``alpha_mask`` / ``masked_loss`` is on; no mask file without one. The expected masks are written by
hand from a synthetic image whose alpha is known.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pti_plugin.config_loading import build_config
from pti_plugin.dataset_preview import main as preview_main, preview_dataset


def _wide_image(folder, name: str) -> None:
    """A 64x32 image, clear (alpha 0) on its 24 left columns: the 32x32 bucket's centre crop keeps columns 16 to 47,
    so the fitted mask is 0 on its 8 left columns and 255 elsewhere (mirrored by a flip)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    rgba[..., 3] = 255
    rgba[:, :24, 3] = 0
    Image.fromarray(rgba).save(folder / name)


def test_the_preview_writes_each_samples_fitted_mask_beside_its_image(tmp_path):
    _wide_image(tmp_path / "data" / "2_tok1", "a.png")
    config = build_config({"train_data_dir": str(tmp_path / "data"), "resolution": 32, "alpha_mask": True,
                           "flip_aug": True, "train_batch_size": 2, "seed": 3})
    preview = preview_dataset(config, n=6, save_images=tmp_path / "out")
    names = [f"step{s.step:05d}_slot{s.slot:03d}" for s in preview.samples]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{n}.png" for n in names] + [f"{n}-mask.png" for n in names])
    flips = set()
    for sample, name in zip(preview.samples, names):
        flip = sample.augmentation == "flip"
        flips.add(flip)
        expected = np.full((32, 32), 255, np.uint8)
        if flip:
            expected[:, 24:] = 0
        else:
            expected[:, :8] = 0
        mask = Image.open(tmp_path / "out" / f"{name}-mask.png")
        assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected), name
        pixels = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        red = np.where(np.arange(16, 48) < 24, 255, np.arange(16, 48) * 4)  # the crop; clear pixels on white
        assert np.array_equal(pixels[0, :, 0], red[::-1] if flip else red)  # the mask's crop and flip
    assert flips == {False, True}


def test_no_mask_file_without_a_loss_mask(tmp_path):
    _wide_image(tmp_path / "data" / "2_tok1", "a.png")
    preset = tmp_path / "p.toml"
    preset.write_text(f"train_data_dir = '{tmp_path / 'data'}'\nresolution = 32\n")
    assert preview_main(["--preset", str(preset), "--n", "2", "--save_images", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step00000_slot000.png", "step00001_slot000.png"]
