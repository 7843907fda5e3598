"""Which images form each batch, and every per-sample random draw, as pure functions of the seed.

The global batch of optimizer step ``k`` of stage ``s`` (batch size x processes x accumulation
samples) is a function of (seed, s, k) only; each micro-batch of each process takes its slots.
Per-sample randomness (flip, noise, timestep) comes from a generator seeded by (seed, stage,
step, slot in the global batch). So an N-process run, a resumed
run and a run that skipped a step all see the same samples and draws by construction.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .caption_templates import stage_templates


def _seed64(*parts: int) -> int:
    """A 63-bit seed derived from ``parts`` (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU torch generator for one sample's draws, seeded by ``(seed, *parts)``."""
    return torch.Generator().manual_seed(_seed64(seed, *parts))


class SampleOrder:
    """Epochs of global batches over ``entries`` (one per image repeat), same-bucket batches only.

    Within an epoch every entry appears once; a bucket whose count is not a multiple of the global
    batch has its last batch completed by wrapping around its own shuffled list.
    """

    def __init__(self, entry_buckets: list[tuple[int, int]], global_batch: int, seed: int, stage_index: int,
                 steps: int | None = None, templates: tuple[str, ...] = ()):
        if global_batch < 1:
            raise ValueError("global batch size must be >= 1")
        self.global_batch = global_batch
        self.steps = steps  # the stage's optimizer steps, when known (token_warmup_step's fraction is of them)
        self.templates = templates  # captions that replace the training captions (``caption_templates.py``)
        self.seed = seed
        self.stage_index = stage_index
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(entry_buckets):
            groups.setdefault(bucket, []).append(index)
        self._groups = [groups[b] for b in sorted(groups)]
        self.batches_per_epoch = sum(-(-len(g) // global_batch) for g in self._groups)

    @lru_cache(maxsize=4)
    def epoch(self, epoch: int) -> list[list[int]]:
        """The global batches (lists of entry indices) of ``epoch``, in order."""
        rng = np.random.default_rng(_seed64(self.seed, self.stage_index, epoch, 0xB47C))
        batches = []
        for group in self._groups:
            perm = [group[i] for i in rng.permutation(len(group))]
            for start in range(0, len(perm), self.global_batch):
                batch = perm[start : start + self.global_batch]
                batch += [perm[i % len(perm)] for i in range(self.global_batch - len(batch))]
                batches.append(batch)
        return [batches[i] for i in rng.permutation(len(batches))]

    def global_batch_at(self, step: int) -> list[int]:
        """Entry indices of the global batch consumed at optimizer ``step`` (0-based, within the stage)."""
        return self.epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]


def stage_order(config: Any, stage_index: int, entry_buckets: list[tuple[int, int]], global_batch: int) -> SampleOrder:
    """The :class:`SampleOrder` of stage ``stage_index`` of ``config`` (its steps, and its caption templates:
    :func:`caption_templates.stage_templates`)."""
    stage = config.stages[stage_index]
    return SampleOrder(entry_buckets, global_batch, config.seed, stage_index, stage.steps,
                       stage_templates(config, stage.kind))
