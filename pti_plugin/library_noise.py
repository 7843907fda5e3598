"""Silencing the library messages that say nothing to a user of this package.

Only exact, known messages are dropped; everything else the libraries log passes through:

- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..."
  (and the same for other image processors): diffusers' pipeline modules import image processors
  for safety checkers and feature extractors this package never uses.
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community: ...": at import (peft and
  diffusers import it), its CPU backend asks the Hub for an optional 4-bit kernel; this package does no
  4-bit matmul, and an offline machine cannot fetch it anyway; in offline mode (``train_pti.py`` sets
  ``HF_HUB_OFFLINE``) the kernels package also says it skips that kernel's publisher check.
- diffusers' "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting
  directly with `to()` ...": printed by every ``pipeline.to(device, dtype)`` although the list of such
  modules is empty (only the empty-list message is dropped: a non-empty list still warns).

And, only while :func:`pti_plugin.load_pti` loads a file without text-encoder keys, diffusers' "No LoRA
keys associated to CLIPTextModel found with the prefix='text_encoder'" (:data:`NO_TEXT_ENCODER_LORA`):
such a file has none by design (a UNet-only LoRA), so the message says nothing; the same for a file without
UNet keys (kohya's ``network_train_text_encoder_only``) and "No LoRA keys associated to UNet2DConditionModel"
(:data:`NO_UNET_LORA`). And, only while it adds
an embedding's token (diffusers' ``load_textual_inversion``), transformers' "The new embeddings will be
initialized from a multivariate normal distribution ..." (:data:`NEW_TOKEN_INIT`): the new row is
overwritten with the file's vector right after, so how it was initialised says nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: (logger name, a fragment of the message to drop)
KNOWN_NOISE = (("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
               ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
               ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
               ("diffusers.models.modeling_utils", "that should be kept in float32: []. Casting directly with `to()`"))

#: Scoped (:func:`dropped`): diffusers' message for a text encoder the LoRA file has no keys for.
NO_TEXT_ENCODER_LORA = ("diffusers.loaders.lora_base", "No LoRA keys associated to")
#: Scoped: diffusers' message for a UNet the LoRA file has no keys for.
NO_UNET_LORA = ("diffusers.loaders.peft", "No LoRA keys associated to UNet2DConditionModel")
#: Scoped: transformers' note on how ``resize_token_embeddings`` fills a new row (then overwritten).
NEW_TOKEN_INIT = ("transformers.modeling_utils", "The new embeddings will be initialized from a multivariate normal")


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_known_noise() -> None:
    """Attach the filters once (idempotent)."""
    for name, fragment in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and fragment in f.fragments for f in logger.filters):
            logger.addFilter(_DropMessages((fragment,)))


@contextlib.contextmanager
def dropped(logger_name: str, fragment: str) -> Iterator[None]:
    """Drop ``logger_name``'s messages containing ``fragment`` inside the ``with`` block only."""
    logger, drop = logging.getLogger(logger_name), _DropMessages((fragment,))
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
