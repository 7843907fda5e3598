"""Image pixels and their VAE latents, optionally cached in memory or on disk.

A latent is drawn from the VAE's posterior with a generator seeded by the image and flip, so the
cached and uncached paths give bit-identical latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..atomic_io import save_safetensors_atomic
from .buckets import fit_to_bucket
from .images import read_image
from .dataset import ImageItem
from .sample_order import sample_generator


def load_pixels(item: ImageItem, flip: bool) -> torch.Tensor:
    """The image fitted to its bucket: float32 [3, H, W] in [-1, 1]."""
    array = fit_to_bucket(read_image(item.path), item.bucket)
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class LatentSource:
    """Latents ``[4, H/f, W/f]`` (scaled by the VAE's scaling factor) of an image and flip flag."""

    def __init__(self, vae: torch.nn.Module, items: list[ImageItem], seed: int, cache: bool, to_disk: bool):
        self.vae = vae
        self.items = items
        self.seed = seed
        self.to_disk = to_disk
        self._memory: dict[tuple[int, bool], torch.Tensor] | None = {} if cache else None

    @torch.no_grad()
    def _encode(self, index: int, flip: bool) -> torch.Tensor:
        pixels = load_pixels(self.items[index], flip)[None]  # [1, 3, H, W]
        param = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        generator = sample_generator(self.seed, 0x1A7E, index, int(flip))
        noise = torch.randn(posterior.mean.shape, generator=generator).to(param.device, param.dtype)
        latent = posterior.mean + posterior.std * noise
        return (latent[0] * self.vae.config.scaling_factor).float().cpu()

    def _disk_path(self, index: int, flip: bool) -> Path:
        item = self.items[index]
        w, h = item.bucket
        return item.path.with_name(f"{item.path.stem}.{w}x{h}{'.flip' if flip else ''}.pti_latents.safetensors")

    def fill_cache(self) -> None:
        """Encode every image (and its flip when flip_aug) now, into memory and optionally disk."""
        if self._memory is None:
            return
        from safetensors.torch import load_file

        for index, item in enumerate(self.items):
            for flip in (False, True) if item.flip_aug else (False,):
                path = self._disk_path(index, flip)
                if self.to_disk and path.is_file():
                    latent = load_file(path)["latent"]
                else:
                    latent = self._encode(index, flip)
                    if self.to_disk:
                        save_safetensors_atomic(path, {"latent": latent})
                self._memory[(index, flip)] = latent

    def latent(self, index: int, flip: bool) -> torch.Tensor:
        if self._memory is not None:
            if (index, flip) not in self._memory:
                raise KeyError(f"latent of {self.items[index].path} (flip={flip}) is not cached; call fill_cache()")
            return self._memory[(index, flip)]
        return self._encode(index, flip)
