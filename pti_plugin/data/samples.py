"""One training sample as the loop feeds it: which image, its augmentation and its final caption.

:func:`draw_sample` is the single function the training batches (``batch_source.py``) and the dataset preview
call, so the preview shows exactly what training sees for the same seed. All draws come from the
per-sample generator ``sample_generator(seed, stage, step, slot, 0xF11B)``: first the augmentation
(a fixed block of 6 numbers, the flip first, and a random face crop's numbers), then the caption transformations.
The caption's token warm-up counts ``step`` within the stage (and ``order.steps``, the stage's length, for a
fraction); the stage's caption templates (``order.templates``) replace its training captions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .augment import Augmentation, draw_augmentation
from .captions import final_caption
from .dataset import ImageItem
from .sample_order import SampleOrder, sample_generator

SAMPLE_STREAM = 0xF11B


@dataclass(frozen=True)
class Sample:
    """Slot ``slot`` of optimizer step ``step``: the item, its augmentation, caption and 1-based epoch."""

    step: int
    slot: int
    item_index: int
    augmentation: Augmentation
    caption: str
    epoch: int


def epoch_of(order: SampleOrder, step: int) -> int:
    """1-based epoch (within the stage) of optimizer ``step``, as kohya counts epochs."""
    return step // order.batches_per_epoch + 1


def draw_sample(
    items: list[ImageItem], entries: list[int], order: SampleOrder, seed: int, stage_index: int, step: int, slot: int,
    token: str, num_vectors: int,
) -> Sample:
    """The sample in ``slot`` of the global batch of optimizer ``step`` of stage ``stage_index``."""
    item_index = entries[order.global_batch_at(step)[slot]]
    item = items[item_index]
    generator = sample_generator(seed, stage_index, step, slot, SAMPLE_STREAM)
    augmentation = draw_augmentation(item, generator)
    epoch = epoch_of(order, step)
    caption = final_caption(item, generator, epoch, token, num_vectors, step=step, stage_steps=order.steps,
                            templates=order.templates)
    return Sample(step, slot, item_index, augmentation, caption, epoch)
