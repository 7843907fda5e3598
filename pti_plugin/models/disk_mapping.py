"""Frozen weights out of process memory on a CPU device: written once to a file and mapped back.

On an accelerator the trainer frees device memory by moving what a stage does not use (the VAE once
latents are cached, the text encoders while ``cache_text_encoder_outputs`` serves a stage) to the
CPU. On a CPU device there is nowhere to move them, so they stay resident: on the SD1.5 architecture
about 0.8 GB (VAE 0.33, CLIP ViT-L 0.49) that a LoRA stage never reads. :func:`map_frozen_to_disk`
writes a module's frozen tensors (``requires_grad`` False) to one file with ``torch.save``, maps it
back with ``torch.load(mmap=True)`` (a private, copy-on-write mapping) and points each tensor's
``.data`` at its mapped copy. The values are unchanged bit for bit and the ``Parameter`` objects are
the same (an optimizer, DDP or a hook holding them sees no difference); the operating system pages a
tensor in when something reads it (a sample, a later stage) and may drop those pages again under
memory pressure, and an in-place write (a later stage training it) copies only the pages it touches.
The file is unlinked as soon as it is mapped (the mapping keeps its blocks until the process ends),
so nothing is left in the folder, even after a crash. Not done on Windows, where a mapped file cannot
be unlinked, nor for a module marked :func:`keep_in_memory`: under ``disable_mmap_load_safetensors`` the base
model's modules are (a user who turns memory-mapped reads off, for a file system where they are slow or fail,
gets no memory-mapped weights at all; they stay in process memory, as in kohya, which never maps them).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from pathlib import Path

import torch
from torch import nn

#: Marks a module whose frozen tensors are mapped (mapping it again would only write another file).
MAPPED_FLAG = "_pti_disk_mapped"
#: Marks a module whose frozen tensors stay in process memory (:func:`keep_in_memory`).
IN_MEMORY_FLAG = "_pti_kept_in_memory"
_counter = itertools.count()
logger = logging.getLogger(__name__)


def frozen_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s parameters that do not train and its buffers, on the CPU, by name (shared ones once)."""
    tensors = {name: p for name, p in module.named_parameters() if not p.requires_grad}
    tensors |= dict(module.named_buffers())
    return {name: t for name, t in tensors.items() if t.device.type == "cpu" and t.numel() > 0}


def keep_in_memory(module: nn.Module) -> None:
    """Never map ``module``'s frozen tensors from a file (:func:`map_frozen_to_disk` leaves it alone)."""
    setattr(module, IN_MEMORY_FLAG, True)


def kept_in_memory(module: nn.Module) -> bool:
    """Whether ``module`` is marked :func:`keep_in_memory`."""
    return getattr(module, IN_MEMORY_FLAG, False)


def map_frozen_to_disk(module: nn.Module, folder: Path) -> int:
    """Move ``module``'s frozen CPU tensors into a file under ``folder`` (unlinked once mapped) and back
    as a memory map; returns the bytes that left process memory (0 when nothing was done: on Windows, a module
    mapped already or one marked :func:`keep_in_memory`)."""
    if os.name == "nt" or getattr(module, MAPPED_FLAG, False) or kept_in_memory(module):
        return 0
    tensors = frozen_tensors(module)
    if not tensors:
        return 0
    path = folder / f".pti-mapped-{os.getpid()}-{next(_counter)}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({name: t.detach() for name, t in tensors.items()}, path)
        mapped = torch.load(path, mmap=True, weights_only=True)
    except OSError as exc:  # a full or read-only disk: the weights stay in memory, the run goes on
        logger.warning("could not map frozen weights from a file in %s (%s); they stay in memory", folder, exc)
        return 0
    finally:
        with contextlib.suppress(OSError):  # no file was written when the folder is unusable
            path.unlink(missing_ok=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.data = mapped[name]
    setattr(module, MAPPED_FLAG, True)
    return sum(t.numel() * t.element_size() for t in tensors.values())
