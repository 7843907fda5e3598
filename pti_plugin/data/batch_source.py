"""This process's micro-batches as drawn samples, built by a ``torch.utils.data.DataLoader``.

Item ``(stage, step, micro)`` of :class:`MicroBatchDraws` is this process's share of micro-batch
``micro`` of optimizer step ``step``: per slot the :func:`draw_sample` draw (item, augmentation,
final caption), the image path, whether it is a regularisation image, SDXL's size numbers and,
when the latent cache cannot serve the draw, the augmented pixels (float32 CPU). Everything here
is CPU work on image files: no model, VAE or accelerator device is touched, so it may run in
worker processes (``max_data_loader_n_workers``). Every draw comes from the per-sample generator
(seed, stage, step, slot), so what an item holds does not depend on which process built it or
when: runs with any number of workers are bit-identical. The trainer turns pixels into latents.

Slots of a step's global batch are laid out micro-batch-major, then rank, then sample.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .augment import Augmentation
from .buckets import size_conditioning
from .dataset import ImageItem
from .latents import needs_pixels
from .masks import pixels_and_mask
from .sample_order import SampleOrder
from .samples import draw_sample

Key = tuple[int, int, int]  # (stage, step, micro)


@dataclass
class DrawnMicroBatch:
    """One process's micro-batch before the model: per slot the draw, and pixels where no cached latent serves it.

    ``sizes`` float32 [b, 6] (see :func:`size_conditioning`); ``pixels[i]`` float32 [3, H, W] in
    [-1, 1], or None when the latent cache holds slot i's latent; ``masks[i]`` float32 [H, W] in [0, 1], slot i's
    loss mask fitted as its pixels are (``masks.py``), or None when its image has none or the cache holds it.
    """

    key: Key
    slots: list[int]
    item_indices: list[int]
    augmentations: list[Augmentation]
    captions: list[str]
    paths: list[str]
    is_reg: list[bool]
    sizes: torch.Tensor
    pixels: list[torch.Tensor | None]
    masks: list[torch.Tensor | None]


@dataclass(frozen=True)
class DrawSettings:
    """What a draw depends on besides the key: the run's seed, token, batch layout and whether latents are cached."""

    seed: int
    token: str
    num_vectors: int
    batch_size: int  # per process and micro-batch
    processes: int
    rank: int
    latents_cached: bool


class MicroBatchDraws(Dataset):
    """Map-style dataset: ``(stage, step, micro)`` -> :class:`DrawnMicroBatch` of this process."""

    def __init__(self, items: list[ImageItem], entries: list[int], orders: list[SampleOrder], settings: DrawSettings):
        self.items, self.entries, self.orders, self.settings = items, entries, orders, settings

    def __getitem__(self, key: Key) -> DrawnMicroBatch:
        stage, step, micro = key
        s = self.settings
        first = (micro * s.processes + s.rank) * s.batch_size
        slots = list(range(first, first + s.batch_size))
        draws = [draw_sample(self.items, self.entries, self.orders[stage], s.seed, stage, step, slot, s.token,
                             s.num_vectors) for slot in slots]
        items = [self.items[d.item_index] for d in draws]
        sizes = [size_conditioning(i.image_size, i.bucket, d.augmentation.flip) for i, d in zip(items, draws)]
        drawn = [draw_inputs(i, d.augmentation, s.latents_cached) for i, d in zip(items, draws)]
        pixels, masks = [p for p, _ in drawn], [m for _, m in drawn]
        return DrawnMicroBatch(key, slots, [d.item_index for d in draws], [d.augmentation for d in draws],
                               [d.caption for d in draws], [str(i.path) for i in items], [i.is_reg for i in items],
                               torch.tensor(sizes, dtype=torch.float32), pixels, masks)


def draw_inputs(item: ImageItem, augmentation: Augmentation, latents_cached: bool,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A draw's pixels and fitted loss mask (:func:`masks.pixels_and_mask`: the image decoded once), or (None, None)
    when the latent cache serves it (:func:`latents.needs_pixels`; its mask is cached with its latent)."""
    return pixels_and_mask(item, augmentation) if needs_pixels(augmentation, latents_cached) else (None, None)


class _StageKeys:
    """The loader's sampler: the keys of the current stage's remaining micro-batches, in training order."""

    def __init__(self) -> None:
        self.keys: list[Key] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _init_worker(worker_id: int) -> None:
    """A worker process: one torch thread; Ctrl-C (sent to the whole process group) is the main process's to handle."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class MicroBatchStream:
    """The run's micro-batches in order, from one DataLoader over :class:`MicroBatchDraws`.

    ``workers`` = 0 builds them in this process, N in ``min(N, os.cpu_count())`` worker processes (kohya's cap in
    ``train_network.py``, silent as kohya's); ``persistent`` keeps the worker processes from one stage to the next.
    :meth:`start_stage` points the loader at a stage's remaining steps (a resumed stage starts at its resumed
    step); :meth:`get` returns the micro-batch of (step, micro).
    """

    def __init__(self, draws: MicroBatchDraws, workers: int, persistent: bool, accumulation: int):
        self.draws, self.accumulation = draws, accumulation
        self._keys = _StageKeys()
        workers = min(workers, os.cpu_count() or 1)  # kohya: min(max_data_loader_n_workers, os.cpu_count())
        # batch_size=None: each item is already a micro-batch. The generator keeps the loader from
        # drawing its workers' base seed from torch's global generator (nothing here uses that seed).
        self._loader: DataLoader | None = DataLoader(
            draws, batch_size=None, sampler=self._keys, num_workers=workers, persistent_workers=persistent and workers > 0,
            worker_init_fn=_init_worker if workers > 0 else None, generator=torch.Generator().manual_seed(draws.settings.seed),
        )
        self._iterator = None

    def start_stage(self, stage: int, first_step: int, steps: int) -> None:
        self._keys.keys = [(stage, step, micro) for step in range(first_step, steps) for micro in range(self.accumulation)]
        self._iterator = iter(self._loader)

    def get(self, stage: int, step: int, micro: int) -> DrawnMicroBatch:
        """The micro-batch of ``(stage, step, micro)``; earlier ones not asked for (a step broken off by a
        non-finite loss) are passed over."""
        wanted = (stage, step, micro)
        while True:
            drawn = next(self._iterator)
            if drawn.key == wanted:
                return drawn
            if drawn.key > wanted:
                raise RuntimeError(f"micro-batch {wanted} asked for after {drawn.key}: micro-batches are drawn in order")

    def close(self) -> None:
        """Stop any worker processes (they also stop when this object is dropped)."""
        self._iterator = self._loader = None
