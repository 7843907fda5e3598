"""Review of session 36's changes: mends of what the review found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import draw_character
from .test_two_processes_r5 import fill_as_two_processes
from pti_plugin.config_loading import build_config
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.latents import LatentSource
from pti_plugin.data.scanning import scan_images


def test_two_processes_hold_the_same_latents_of_an_image_two_subsets_share(tiny_model, tmp_path):
    """One folder in two datasets (kohya trains each image under both datasets' captions): each image is two draws whose
    latent-cache file is the same. Two processes caching to disk (vae_batch_size 1) encode one draw each and write
    that file twice; both must then train on one latent per draw, the one the file holds (which a later run reads),
    not each its own encoding beside the other's file (before: the processes' latents of such a draw differed)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        draw_character(folder / f"{i}.png", 3 * i)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text("[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = 'imgs'\nclass_tokens = 'tok1'\n"
                       "[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = 'imgs'\nclass_tokens = 'tok1 girl'\n")
    config = build_config({"dataset_config": str(dataset)})
    items = scan_images(config, load_subsets(config))
    assert sorted(i.path.name for i in items) == ["0.png", "0.png", "1.png", "1.png"]
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    sources = [LatentSource(vae, items, seed=0, cache=True, to_disk=True, batch_size=1) for _ in range(2)]
    fill_as_two_processes(sources)
    files = sorted(Path(folder).glob("*.pti_latents.safetensors"))
    assert len(files) == 2  # one per image
    on_disk = {f.name.split(".")[0]: load_file(f)["latent"] for f in files}
    for index, item in enumerate(items):
        for source in sources:
            assert torch.equal(source.latent(index, False), on_disk[item.path.stem]), (index, item.path.name)


def test_skip_image_resolution_in_a_kohya_config_file_reads_as_on_the_command_line(tmp_path):
    """Every size key takes kohya's "W,H" text on both input paths (before: only ``resolution`` in a config_file, so
    ``skip_image_resolution = "256,192"`` was refused as not ``int | list[int]``)."""
    from pti_plugin.config import ConfigError
    from pti_plugin.config_loading import load_config

    (tmp_path / "imgs").mkdir()
    (tmp_path / "p.toml").write_text('config_file = "kohya.toml"\n')
    (tmp_path / "kohya.toml").write_text('train_data_dir = "imgs"\nskip_image_resolution = "256,192"\n')
    assert load_config(tmp_path / "p.toml").skip_image_resolution == [256, 192]
    (tmp_path / "kohya.toml").write_text('train_data_dir = "imgs"\nskip_image_resolution = "256,"\n')
    with pytest.raises(ConfigError, match=r"key 'skip_image_resolution' expects a size as kohya writes it.*got '256,'$"):
        load_config(tmp_path / "p.toml")
