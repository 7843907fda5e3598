"""The latent disk cache: reused for the same VAE, seed and image; never for another VAE or seed."""

from __future__ import annotations

import copy
import shutil

import torch
from safetensors.torch import save_file

from pti_plugin.config_loading import build_config
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.latents import LatentSource, module_digest
from pti_plugin.data.scanning import scan_images


def _items(folder):
    config = build_config({"train_data_dir": str(folder), "resolution": 32})
    return scan_images(config, load_subsets(config))


def _cache_files(folder):
    return sorted(folder.rglob("*.pti_latents.safetensors"))


def test_disk_cache_is_keyed_by_vae_weights_and_seed(tiny_model, tiny_dataset, tmp_path):
    from diffusers import AutoencoderKL

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)  # the cache is written beside the images
    items = _items(data)
    vae_a = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    vae_b = copy.deepcopy(vae_a)
    with torch.no_grad():
        vae_b.encoder.conv_in.weight[0, 0, 0, 0] += 0.5  # two VAEs differing in one weight
    assert module_digest(vae_a) != module_digest(vae_b) and module_digest(vae_a) == module_digest(copy.deepcopy(vae_a))

    LatentSource(vae_a, items, seed=3, cache=True, to_disk=True).fill_cache()
    files_a = _cache_files(data)
    assert len(files_a) == len(items)
    # Mark one cached file: a later run that reuses it returns the marker, one that must not reuse it never does.
    marker = torch.full_like(LatentSource(vae_a, items, seed=3, cache=False, to_disk=False).latent(0, False), 7.0)
    marked = next(f for f in files_a if f.name.startswith(items[0].path.stem + "."))
    save_file({"latent": marker}, str(marked))

    same = LatentSource(vae_a, items, seed=3, cache=True, to_disk=True)
    same.fill_cache()
    assert torch.equal(same.latent(0, False), marker) and _cache_files(data) == files_a  # reused, nothing new

    for vae, seed in ((vae_b, 3), (vae_a, 4)):
        source = LatentSource(vae, items, seed=seed, cache=True, to_disk=True)
        source.fill_cache()
        fresh = LatentSource(vae, items, seed=seed, cache=False, to_disk=False)
        for index in range(len(items)):
            assert torch.equal(source.latent(index, False), fresh.latent(index, False))
    assert len(_cache_files(data)) == 3 * len(items)  # each (VAE, seed) keeps its own files


def test_disk_cache_is_keyed_by_the_image(tiny_model, tiny_dataset, tmp_path):
    from diffusers import AutoencoderKL

    from .conftest import draw_character

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    items = _items(data)
    LatentSource(vae, items, seed=0, cache=True, to_disk=True).fill_cache()
    draw_character(items[0].path, 9)  # the image is redrawn in place
    source = LatentSource(vae, items, seed=0, cache=True, to_disk=True)
    source.fill_cache()
    assert torch.equal(source.latent(0, False), LatentSource(vae, items, seed=0, cache=False, to_disk=False).latent(0, False))


def test_a_disk_cache_fill_hashes_each_image_once(tiny_model, tiny_dataset, tmp_path, monkeypatch):
    """With flip_aug, 4 images are 8 draws, each looked up on disk and then written (a first run) or read (a second):
    each image's bytes are read for its cache key once per run, not at every look and write of its two files."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    config = build_config({"train_data_dir": str(data), "resolution": 32, "flip_aug": True})
    items = scan_images(config, load_subsets(config))
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    reads: list[str] = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (reads.append(self.name), read_bytes(self))[1])
    images = sorted(item.path.name for item in items)
    for run in ("writes", "reads"):
        reads.clear()
        LatentSource(vae, items, seed=0, cache=True, to_disk=True).fill_cache()
        assert sorted(name for name in reads if name.endswith(".png")) == images, run
    assert len(_cache_files(data)) == 2 * len(items)
