"""``cache_text_encoder_outputs``: each distinct final caption encoded once per stage, and the text
encoders off the accelerator while nothing needs them.

In a stage whose text side is frozen (no pivot, no text-encoder LoRA training) the conditioning of a
caption never changes, so :class:`TextConditioningCache` keeps one row per final caption (the key is
the caption the text encoder would see, so any caption augmentation stays exact). When, moreover,
every caption a stage can draw is known in advance (no shuffling, tag dropout or wildcards: see
:func:`~pti_plugin.data.captions.possible_captions`), all of them are encoded at the stage's start
and, on an accelerator, the text encoders move to the CPU (kohya's behaviour with
``cache_text_encoder_outputs``: SDXL's two encoders are about 1.6 GB in fp16). They come back for
samples, at the stage's end, and whenever anything (a plugin, through ``state.encode``) encodes
during the stage (:meth:`TrainableModel.encode` brings them back and counts it in ``text_returns``).
On a CPU device, where there is nowhere to move them, their frozen weights are mapped from a file
instead (:mod:`~pti_plugin.models.disk_mapping`): out of process memory until something reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data.captions import possible_captions
from .hooks import Batch
from .models.disk_mapping import kept_in_memory, map_frozen_to_disk
from .models.family import Conditioning
from .models.trainable import TrainableModel

#: Captions encoded per forward when the stage's captions are encoded up front.
ENCODE_CHUNK = 16


class TextConditioningCache:
    """Final caption -> its conditioning row (no size conditioning), for one stage at a time."""

    def __init__(self, model: TrainableModel, enabled: bool, device: torch.device, map_folder: Path):
        self.model, self.enabled, self.device = model, enabled, device
        self.map_folder = map_folder  # where a CPU device's text encoders are mapped from (the file is unlinked)
        self.rows: dict[str, Conditioning] = {}
        self.active = False  # this stage reads conditionings from the cache
        self.text_trains = True  # this stage trains the pivot or a text-encoder LoRA

    def caches(self, text_trains: bool) -> bool:
        """Whether a stage caches its conditioning: the option is on and its text side is frozen (``text_trains``:
        the stage trains the pivot or a text-encoder LoRA)."""
        return self.enabled and not text_trains

    def start_stage(self, text_trains: bool, items: list, token: str, num_vectors: int) -> str | None:
        """Empty the cache; for a frozen-text stage whose captions are all known, encode them and move the
        text encoders to the CPU (on a CPU device: map their frozen weights from a file). Returns a line
        saying so, or None."""
        self.rows = {}
        self.text_trains = text_trains
        self.active = self.caches(text_trains)
        if not self.active:
            return None
        captions: set[str] = set()
        for item in items:
            known = possible_captions(item, token, num_vectors)
            if known is None:
                return None  # captions vary from draw to draw: encode lazily, the encoders stay
            captions.update(known)
        ordered = sorted(captions)
        self.rows.update(self.encoded_rows(ordered))
        if self._can_offload():
            self.model.offload_text_encoders()
            return f"text encoders moved to the CPU for this stage ({len(ordered)} captions encoded up front)"
        mapped = sum(map_frozen_to_disk(te, self.map_folder) for te in self.model.base.text_encoders)
        weights = (f"frozen weights ({mapped / 2**30:.2f} GiB) now mapped from a file" if mapped else "weights kept in memory "
                   "(disable_mmap_load_safetensors)" if kept_in_memory(self.model.base.text_encoder) else "weights mapped from a file")
        return f"text encoders' {weights} ({len(ordered)} captions encoded up front)"

    def _can_offload(self) -> bool:
        """Whether the text encoders can leave the device: on a CPU device there is nowhere to move them
        (their frozen weights are mapped from a file instead)."""
        return self.device.type != "cpu"

    def conditioning(self, batch: Batch) -> Conditioning:
        """The batch's conditioning [b, 77, d] (+ SDXL's pooled embedding and time ids)."""
        model = self.model
        if not self.active:
            with torch.set_grad_enabled(self.text_trains):  # a frozen text side builds no graph
                return model.weigh(model.encode(batch.input_ids, sizes=batch.sizes), batch.captions)
        missing = list(dict.fromkeys(c for c in batch.captions if c not in self.rows))
        if missing:
            self.rows.update(self._encoded(missing, batch.input_ids[[batch.captions.index(c) for c in missing]]))
        cond = Conditioning.cat([self.rows[c] for c in batch.captions])
        return cond.with_extra(model.family.size_conditioning(batch.sizes)) if batch.sizes is not None else cond

    def encoded_rows(self, captions: list[str]) -> dict[str, Conditioning]:
        """Each of ``captions`` encoded to its conditioning row, :data:`ENCODE_CHUNK` at a time, without gradients and
        without storing them (the cache's encoding up front; the validation's held-out captions use it too)."""
        rows: dict[str, Conditioning] = {}
        for start in range(0, len(captions), ENCODE_CHUNK):
            chunk = captions[start : start + ENCODE_CHUNK]
            rows.update(self._encoded(chunk, self.model.tokenize_captions(chunk)))
        return rows

    def _encoded(self, captions: list[str], input_ids: torch.Tensor) -> dict[str, Conditioning]:
        """``captions`` (their ids [n, 77], or [n, encoders, 77]) encoded without gradients: caption -> its row."""
        with torch.no_grad():
            encoded = self.model.weigh(self.model.encode(input_ids.to(self.device)), captions).detach()
        return {c: encoded.rows(slice(j, j + 1)) for j, c in enumerate(captions)}

    def end_stage(self) -> None:
        """The text encoders back on the device (the next stage, samples and saves may need them)."""
        self.model.restore_text_encoders()
