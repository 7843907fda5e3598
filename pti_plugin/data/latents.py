"""Image pixels and their VAE latents, optionally cached in memory or on disk.

A latent is drawn from the VAE's posterior with a generator seeded by the image and flip, so the
cached and uncached paths give bit-identical latents. Draws with ``color_aug``/``random_crop``
(which change the pixels at every draw) are encoded on the fly (:meth:`LatentSource.latent_for`);
they cannot be cached, and the dataset refuses them together with ``cache_latents``.

``vae_batch_size`` (kohya's): :meth:`LatentSource.fill_cache` encodes the images of one bucket size that many at a time.
Each image's posterior sample is still drawn from its own generator, as alone; the batched convolutions may round
differently in the last bits, so a latent cached in batches equals the one-by-one latent within 1e-4 (absolute; about
5e-6 measured on the toy VAE in float32), not bit for bit. The disk cache's key does not name the batch size (as
kohya's cache does not): a batch's bits also depend on which images share it, so no key could pin them.

The disk cache (``cache_latents_to_disk``) keeps each latent beside its image in
``<stem>.<w>x<h>[.flip].<key>.pti_latents.safetensors``; ``key`` digests what the latent depends
on: the VAE's weights (names, dtypes, shapes and values: :func:`module_digest`) and its
``scaling_factor`` (the model's: the same VAE under SD1.5 and SDXL scales its latents differently), the
seed of the posterior draw and the image file's bytes, and, when they change the pixels, the resize filter
(``resize_interpolation`` other than Lanczos, by its PIL filter) and a fixed face crop (``face_crop_aug_range``
with lo = hi: the face box and range). A different VAE (another model's, or ``vae``'s replacement), scale, seed,
image, filter or face crop therefore never reuses a stale latent; it writes its own file beside the others. The
key of an image with neither is what it was before they existed.

Loss masks (``masks.py``) are cached with the latents: per image and flip, the mask fitted to the bucket and
area-downsampled to the latent's size (kohya's ``apply_masked_loss``), in memory and as the disk file's ``mask``
tensor. The key of an image with a mask also digests its source (``alpha``: the image's bytes, already in the key;
a mask file: its bytes) and the mask's filter when not Lanczos (``masks.mask_filter``), so an edited mask, another
filter, or ``alpha_mask`` turned on, never reuses a file without it; the key of an image without a mask names no
mask (VAE, scale, seed and image only).

A process killed while writing a disk-cache file (SIGKILL, a power cut) leaves its hidden temporary
``.<cache file name>.<8 random characters>.tmp`` (``atomic_io``'s naming) beside the images. The next run that
caches into that folder removes each such temporary whose last write is :data:`STALE_TEMPORARY_SECONDS` old or more,
naming it (:func:`remove_stale_temporaries`): a cache file takes well under a second to write, so an older one has
no live writer, while a younger one may be another run's, writing now, and is kept. Only names of exactly that
pattern are touched (a plain file, hidden, a cache file's name with ``.pti_latents.safetensors``, then the random
part and ``.tmp``); nothing else in the user's folder is.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import torch

from ..atomic_io import save_safetensors_atomic
from ..main_process_checks import passed_without_refusal
from .augment import Augmentation, augmented_pixels
from .buckets import resample_filter
from .dataset import ImageItem
from .masks import fitted_mask, has_mask, latent_mask, mask_filter, pixels_and_mask, stack_masks
from .sample_order import sample_generator

logger = logging.getLogger(__name__)

#: Age (seconds since its last write) from which a disk-cache temporary has no live writer (module docstring).
STALE_TEMPORARY_SECONDS = 10 * 60
#: The hidden temporary of a disk-cache file: ``.<stem>.<w>x<h>[.flip].<key>.pti_latents.safetensors.<random>.tmp``
#: (``atomic_io.atomic_path``'s ``mkstemp`` names: 8 characters of ``[a-z0-9_]``).
_TEMPORARY = re.compile(r"\..+\.\d+x\d+(\.flip)?\.[0-9a-f]{12}\.pti_latents\.safetensors\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the disk-cache temporaries in ``folder`` a killed writer left (module docstring), each named in a
    warning; return them."""
    now = time.time() if now is None else now
    removed = []
    for path in sorted(folder.iterdir()):
        try:
            if (not _TEMPORARY.fullmatch(path.name) or path.is_symlink() or not path.is_file()
                    or now - path.stat().st_mtime < STALE_TEMPORARY_SECONDS):
                continue
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: left as it is
            continue
        removed.append(path)
        logger.warning("removed %s, an incomplete latent-cache file left by a run killed while caching", path)
    return removed


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

    def __init__(self, vae: torch.nn.Module, items: list[ImageItem], seed: int, cache: bool, to_disk: bool,
                 batch_size: int = 1):
        self.vae = vae
        self.items = items
        self.seed = seed
        self.to_disk = to_disk
        self.batch_size = batch_size  # kohya's vae_batch_size: images of one bucket encoded together by fill_cache
        self._memory: dict[tuple[int, bool], torch.Tensor] | None = {} if cache else None
        self._masks: dict[tuple[int, bool], torch.Tensor] = {}  # latent-sized loss masks [1, h, w] of cached draws
        self._vae_digest: str | None = None  # computed once, when the disk cache is first used
        self._keys: dict[int, str] = {}  # each image's cache key, computed once (its files' looks, writes, read-backs)

    @property
    def cached(self) -> bool:
        """Whether latents of the plain and flipped images are cached (``cache_latents``)."""
        return self._memory is not None

    def _encode(self, index: int, flip: bool) -> torch.Tensor:
        return self._encode_pixels(load_pixels(self.items[index], flip), index, flip)

    def _encode_pixels(self, pixels: torch.Tensor, index: int, flip: bool) -> torch.Tensor:
        return self._encode_batch(pixels[None], [(index, flip)])[0]

    @torch.no_grad()
    def _encode_batch(self, pixels: torch.Tensor, draws: list[tuple[int, bool]]) -> torch.Tensor:
        """Latents [b, 4, h, w] of ``pixels`` [b, 3, H, W] (one bucket size), the ``draws`` (index, flip) in order.
        Each image's posterior sample comes from its own generator, drawn as for one image alone."""
        param = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        one = (1, *posterior.mean.shape[1:])
        noise = torch.cat([torch.randn(one, generator=sample_generator(self.seed, 0x1A7E, index, int(flip)))
                           for index, flip in draws]).to(param.device, param.dtype)
        latent = posterior.mean + posterior.std * noise
        return (latent * self.vae.config.scaling_factor).float().cpu()

    def cache_key(self, index: int) -> str:
        """The digest of what the image's cached latents depend on: VAE weights and scale, seed and image bytes (and its
        mask, a resize filter other than Lanczos and a fixed face crop, when it has them). Computed once per image (its
        plain and flipped files' looks, writes and read-backs share it: the image's bytes are hashed once)."""
        if index in self._keys:
            return self._keys[index]
        if self._vae_digest is None:
            self._vae_digest = module_digest(self.vae)
        scale = float(self.vae.config.scaling_factor)
        item = self.items[index]
        parts = f"vae={self._vae_digest}|scale={scale!r}|seed={self.seed}|image={file_digest(item.path)}"
        lanczos = resample_filter(None)  # the default filter, named in no key (the keys from before the option)
        if has_mask(item):  # the mask is saved in the file too (and its filter, when not Lanczos)
            parts += f"|mask={'alpha' if item.mask_path is None else file_digest(item.mask_path)}"
            if (filter_of_mask := mask_filter(item)) != lanczos:
                parts += f"@{filter_of_mask.name}"
        if (image_filter := resample_filter(item.resize_interpolation)) != lanczos:  # another filter: other pixels
            parts += f"|filter={image_filter.name}"
        if item.face_box is not None:  # a fixed face crop (a random one is refused with the cache)
            parts += f"|face={item.face_box}@{item.face_crop_aug_range}"
        self._keys[index] = hashlib.blake2b(parts.encode(), digest_size=6).hexdigest()
        return self._keys[index]

    def _disk_path(self, index: int, flip: bool) -> Path:
        item = self.items[index]
        w, h = item.bucket
        key = self.cache_key(index)
        return item.path.with_name(f"{item.path.stem}.{w}x{h}{'.flip' if flip else ''}.{key}.pti_latents.safetensors")

    def fill_cache(self, accelerator=None) -> None:
        """Encode every image (and its flip when flip_aug) now, into memory and optionally disk. Images not on disk
        are encoded ``batch_size`` at a time, those of one bucket size together (kohya's ``vae_batch_size``).

        With the disk cache under several processes (``accelerator``: a multi-process run), each process encodes and
        writes every N-th of those batches, then reads every file back (kohya's caching strategy splits the work the
        same way): each file is written once, by one process, and every process trains on the same latents."""
        if self._memory is None:
            return
        shared = self.to_disk and accelerator is not None and accelerator.num_processes > 1
        if self.to_disk and (not shared or accelerator.is_main_process):
            for folder in sorted({item.path.parent for item in self.items}):
                remove_stale_temporaries(folder)
        pending: dict[tuple[int, int], list[tuple[int, bool]]] = {}  # by bucket: the draws to encode
        for index, item in enumerate(self.items):
            if item.num_repeats < 1:  # a regularisation image left out by kohya's balancing: never drawn
                continue
            for flip in (False, True) if item.flip_aug else (False,):
                if not self._read_disk(index, flip):
                    pending.setdefault(tuple(item.bucket), []).append((index, flip))
        chunks = [draws[start:start + self.batch_size] for draws in pending.values()
                  for start in range(0, len(draws), self.batch_size)]
        rank, processes = (accelerator.process_index, accelerator.num_processes) if shared else (0, 1)
        if shared:
            passed_without_refusal()  # before each barrier: another process's refusal is said at once (cli._fail)
            accelerator.wait_for_everyone()  # every process has looked before any writes: the same batches on each
        for chunk in chunks[rank::processes]:
            drawn = [pixels_and_mask(self.items[index], Augmentation(flip=flip)) for index, flip in chunk]
            pixels = torch.stack([p for p, _ in drawn])  # each image decoded once for its pixels and alpha mask
            for (index, flip), latent, (_, fitted) in zip(chunk, self._encode_batch(pixels, chunk), drawn):
                self._keep_encoded(index, flip, latent.clone(), fitted)
        if shared:
            passed_without_refusal()
            accelerator.wait_for_everyone()  # the other processes' shares are on disk
            # every draw read back, this process's too: draws of one image in two datasets share a file, which each
            # process may have written, so all hold what it holds last
            for index, flip in (draw for chunk in chunks for draw in chunk):
                if not self._read_disk(index, flip):
                    raise FileNotFoundError(f"latent cache file {self._disk_path(index, flip)}, written by this run's "
                                            "processes, is gone: was it removed while the run started?")

    def _read_disk(self, index: int, flip: bool) -> bool:
        """Keep the draw's latent (and mask) from its disk-cache file; False without the disk cache or the file."""
        from safetensors.torch import load_file

        path = self._disk_path(index, flip) if self.to_disk else None
        tensors = load_file(path) if path is not None and path.is_file() else {}
        if "latent" not in tensors:
            return False
        self._keep(index, flip, tensors["latent"], tensors.get("mask"))
        return True

    def _keep_encoded(self, index: int, flip: bool, latent: torch.Tensor, fitted: torch.Tensor | None) -> None:
        """Keep a freshly encoded latent (and the draw's mask, from ``fitted``: its :func:`masks.fitted_mask`) in
        memory, and on disk with ``to_disk``."""
        mask = self.mask_for(index, Augmentation(flip=flip), latent.shape[-2:], fitted) if has_mask(self.items[index]) else None
        if self.to_disk:
            save_safetensors_atomic(self._disk_path(index, flip), {"latent": latent} | ({"mask": mask} if mask is not None else {}),
                                    {"vae_digest": self._vae_digest or "", "seed": str(self.seed),
                                     "scaling_factor": repr(float(self.vae.config.scaling_factor))})
        self._keep(index, flip, latent, mask)

    def _keep(self, index: int, flip: bool, latent: torch.Tensor, mask: torch.Tensor | None) -> None:
        self._memory[(index, flip)] = latent
        if has_mask(self.items[index]):
            self._masks[(index, flip)] = mask if mask is not None else self.mask_for(
                index, Augmentation(flip=flip), latent.shape[-2:])

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

    def mask_for(self, index: int, augmentation: Augmentation, size: tuple[int, int],
                 mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The loss mask [1, h, w] of one draw at the latent ``size`` (h, w): from the cache when it serves the draw,
        else from ``mask`` (the draw's :func:`masks.fitted_mask`; made here when None); None without a mask."""
        if not has_mask(self.items[index]):
            return None
        if (index, augmentation.flip) in self._masks and not needs_pixels(augmentation, self.cached):
            return self._masks[(index, augmentation.flip)]
        return latent_mask(fitted_mask(self.items[index], augmentation) if mask is None else mask, size)

    def loss_masks(self, drawn, size: tuple[int, int], device: torch.device | None = None) -> torch.Tensor | None:
        """A drawn micro-batch's (``batch_source.DrawnMicroBatch``) :meth:`stacked_masks`."""
        return self.stacked_masks(drawn.item_indices, drawn.augmentations, size, device, drawn.masks)

    def stacked_masks(self, indices: list[int], augmentations: list[Augmentation], size: tuple[int, int],
                      device: torch.device | None, fitted: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The loss masks [b, 1, h, w] of draws (``indices``, ``augmentations``) at the latent ``size`` on ``device``
        (all ones for a sample without one), or None when no sample has a mask; ``fitted``: each draw's mask where
        :func:`masks.fitted_mask` made it already (made here where None)."""
        masks = stack_masks([self.mask_for(i, a, size, m) for i, a, m in zip(indices, augmentations, fitted)])
        return None if masks is None else masks.to(device)
