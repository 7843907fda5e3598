"""kohya's validation split (``validation_split``, ``validation_seed``): the images each training subset holds out
for the validation loss (``pti_plugin/validation.py``); they are never trained on.

Per training subset (kohya's ``split_train_val``): its usable images, in file order, are shuffled by Python's
``random`` seeded with the subset's ``validation_seed`` (its dataset's, else the top-level key, else ``seed``), and
the last ``round(n x validation_split)`` of that order are held out; the others train, in their file order, so a
run with a split trains exactly as a run on a folder holding only its training images. Regularisation subsets are
never split (kohya). A split that leaves a subset no training image or no validation image is refused, naming the
key and the subset. The split depends only on the seed, the fraction and the file list, so a resumed run holds out
the same images.

Differences from kohya: kohya keeps ``ceil(n x (1 - split))`` images for training and ``round(n x split)`` for
validation, two counts that can overlap by one image (n = 3, split = 0.5); here the two parts always partition
the subset. kohya splits the file list before reading the images; here the usable ones (unreadable images and
those under ``skip_image_resolution`` are skipped first). kohya without ``validation_seed`` shuffles with the
process's random state (so its training and validation datasets can disagree); here ``seed`` seeds it. kohya
splits DreamBooth-style subsets only (a ``metadata_file`` dataset's validation copy is the whole dataset); here
every training subset is split.
"""

from __future__ import annotations

import logging
import random

from ..config import Config, ConfigError
from .dataset import ImageItem, Subset

logger = logging.getLogger(__name__)

#: The keys that only act with a split (kohya ignores them without one).
VALIDATION_KEYS = ("validation_seed", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps")


def held_out_positions(n: int, fraction: float, seed: int) -> list[int]:
    """Positions (in file order, ascending) of the images of a subset of ``n`` that ``fraction`` holds out with
    ``seed``: kohya's shuffle (``random.seed(seed); random.shuffle(...)``) and its last ``round(n x fraction)``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    count = round(n * fraction)
    return sorted(order[n - count:]) if count else []


def split_validation(config: Config, subsets: list[Subset], train: list[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
    """``train`` (the usable training images, ``subset_index`` into ``subsets``) without the images the subsets'
    ``validation_split`` holds out, and those held out (both in ``train``'s order). Raises ConfigError for a split
    that leaves a training subset no image on either side; warns about validation keys set without any split."""
    by_subset: dict[int, list[int]] = {}
    for position, item in enumerate(train):
        by_subset.setdefault(item.subset_index, []).append(position)
    held: set[int] = set()
    for index, positions in by_subset.items():
        subset = subsets[index]
        if not subset.validation_split:
            continue
        n, fraction = len(positions), subset.validation_split
        count = round(n * fraction)
        if count == 0 or count == n:
            side = "no validation image" if count == 0 else "no training image"
            raise ConfigError(
                f"validation_split = {fraction} leaves {side} in subset {subset.where or subset.name}: it holds out "
                f"round({n} x {fraction}) = {count} of its {n} usable image(s); each training subset needs at least one "
                "image on each side (change validation_split, or set it per [[datasets]] in a dataset_config)")
        seed = subset.validation_seed if subset.validation_seed is not None else config.seed
        held.update(positions[p] for p in held_out_positions(n, fraction, seed))
    if not held:
        given = [key for key in VALIDATION_KEYS if getattr(config, key) is not None]
        if given:
            logger.warning("%s set, but no subset has validation_split > 0: no validation loss is computed (kohya "
                           "validates only images split off with validation_split)", ", ".join(given))
    return [i for p, i in enumerate(train) if p not in held], [i for p, i in enumerate(train) if p in held]


__all__ = ["VALIDATION_KEYS", "held_out_positions", "split_validation"]
