"""Image pixels and their VAE latents, optionally cached in memory or on disk.

A latent is drawn from the VAE's posterior with a generator seeded by the image and flip, so the
cached and uncached paths give bit-identical latents. Draws with ``color_aug``/``random_crop``
(which change the pixels at every draw) are encoded on the fly (:meth:`LatentSource.latent_for`);
they cannot be cached, and the dataset refuses them together with ``cache_latents``.

The disk cache (``cache_latents_to_disk``) keeps each latent beside its image in
``<stem>.<w>x<h>[.flip].<key>.pti_latents.safetensors``; ``key`` digests what the latent depends
on: the VAE's weights (names, dtypes, shapes and values: :func:`module_digest`) and its
``scaling_factor`` (the model's: the same VAE under SD1.5 and SDXL scales its latents differently), the
seed of the posterior draw and the image file's bytes. A different VAE (another model's, or ``vae``'s
replacement), scale, seed or image therefore never reuses a stale latent; it writes its own file beside
the others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..atomic_io import save_safetensors_atomic
from .augment import Augmentation, augmented_pixels
from .dataset import ImageItem
from .sample_order import sample_generator


def module_digest(module: torch.nn.Module) -> str:
    """A hex digest of a module's weights and buffers: names, dtypes, shapes and exact values."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def needs_pixels(augmentation: Augmentation, cached: bool) -> bool:
    """Whether a draw's latent is encoded from its pixels (else the latent cache serves it)."""
    return not (cached and augmentation.cacheable)


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
        self._vae_digest: str | None = None  # computed once, when the disk cache is first used

    @property
    def cached(self) -> bool:
        """Whether latents of the plain and flipped images are cached (``cache_latents``)."""
        return self._memory is not None

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

    def cache_key(self, index: int) -> str:
        """The digest of what the image's cached latents depend on: VAE weights and scale, seed and image bytes."""
        if self._vae_digest is None:
            self._vae_digest = module_digest(self.vae)
        scale = float(self.vae.config.scaling_factor)
        parts = f"vae={self._vae_digest}|scale={scale!r}|seed={self.seed}|image={file_digest(self.items[index].path)}"
        return hashlib.blake2b(parts.encode(), digest_size=6).hexdigest()

    def _disk_path(self, index: int, flip: bool) -> Path:
        item = self.items[index]
        w, h = item.bucket
        key = self.cache_key(index)
        return item.path.with_name(f"{item.path.stem}.{w}x{h}{'.flip' if flip else ''}.{key}.pti_latents.safetensors")

    def fill_cache(self) -> None:
        """Encode every image (and its flip when flip_aug) now, into memory and optionally disk."""
        if self._memory is None:
            return
        from safetensors.torch import load_file

        for index, item in enumerate(self.items):
            if item.num_repeats < 1:  # a regularisation image left out by kohya's balancing: never drawn
                continue
            for flip in (False, True) if item.flip_aug else (False,):
                path = self._disk_path(index, flip) if self.to_disk else None
                if path is not None and path.is_file():
                    latent = load_file(path)["latent"]
                else:
                    latent = self._encode(index, flip)
                    if path is not None:
                        save_safetensors_atomic(path, {"latent": latent},
                                                {"vae_digest": self._vae_digest or "", "seed": str(self.seed),
                                                 "scaling_factor": repr(float(self.vae.config.scaling_factor))})
                self._memory[(index, flip)] = latent

    def latent(self, index: int, flip: bool) -> torch.Tensor:
        if self._memory is not None:
            if (index, flip) not in self._memory:
                raise KeyError(f"latent of {self.items[index].path} (flip={flip}) is not cached; call fill_cache()")
            return self._memory[(index, flip)]
        return self._encode(index, flip)

    def latent_for(self, index: int, augmentation: Augmentation, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The latent of one draw: from the cache when it holds it, else encoded now from ``pixels`` (the
        draw's :func:`augmented_pixels`, e.g. made by a data-loader worker; read here when None)."""
        if not needs_pixels(augmentation, self.cached):
            return self.latent(index, augmentation.flip)
        if pixels is None:
            pixels = augmented_pixels(self.items[index], augmentation)
        return self._encode_pixels(pixels, index, augmentation.flip)
