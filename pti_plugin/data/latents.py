"""Image pixels and their VAE latents, optionally cached in memory or on disk.

A latent is drawn from the VAE's posterior with a generator seeded by the image and flip, so the
cached and uncached paths give bit-identical latents. Draws with ``color_aug``/``random_crop``
(which change the pixels at every draw) are encoded on the fly (:meth:`LatentSource.latent_for`);
they cannot be cached, and the dataset refuses them together with ``cache_latents``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic_io import save_safetensors_atomic
from .augment import Augmentation, augmented_pixels
from .dataset import ImageItem
from .sample_order import sample_generator


def load_pixels(item: ImageItem, flip: bool) -> torch.Tensor:
    """The image fitted to its bucket (centre crop): float32 [3, H, W] in [-1, 1]."""
    return augmented_pixels(item, Augmentation(flip=flip))


class LatentSource:
    """Latents ``[4, H/f, W/f]`` (scaled by the VAE's scaling factor) of an image and flip flag."""

    def __init__(self, vae: torch.nn.Module, items: list[ImageItem], seed: int, cache: bool, to_disk: bool):
        self.vae = vae
        self.items = items
        self.seed = seed
        self.to_disk = to_disk
        self._memory: dict[tuple[int, bool], torch.Tensor] | None = {} if cache else None

    def _encode(self, index: int, flip: bool) -> torch.Tensor:
        return self._encode_pixels(load_pixels(self.items[index], flip), index, flip)

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor, index: int, flip: bool) -> torch.Tensor:
        pixels = pixels[None]  # [1, 3, H, W]
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
            if item.num_repeats < 1:  # a regularisation image left out by kohya's balancing: never drawn
                continue
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

    def latent_for(self, index: int, augmentation: Augmentation) -> torch.Tensor:
        """The latent of one draw: from the cache (or the plain path) when only flipped, else encoded now."""
        if augmentation.cacheable:
            return self.latent(index, augmentation.flip)
        pixels = augmented_pixels(self.items[index], augmentation)
        return self._encode_pixels(pixels, index, augmentation.flip)
