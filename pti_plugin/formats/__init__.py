"""Output and input file formats: kohya LoRA (SD1.5, SDXL), textual-inversion embeddings; the safe loader
(:mod:`pti_plugin.safe_load`) re-exported."""

from ..safe_load import BadSafetensorsError, UnsafeFileError, check_safetensors, safe_torch_load
from .embedding import (
    EmbeddingFormatError,
    bundle_embedding_keys,
    bundled_embedding_parts,
    bundled_embeddings,
    load_embedding,
    load_embeddings,
    save_embedding,
)
from .kohya_lora import (
    LoraFormatError,
    from_kohya,
    kohya_metadata,
    load_lora,
    save_lora,
    sd15_kohya_lora_names,
    to_kohya,
    unexpected_keys,
)

__all__ = [
    "BadSafetensorsError",
    "EmbeddingFormatError",
    "LoraFormatError",
    "UnsafeFileError",
    "bundle_embedding_keys",
    "bundled_embedding_parts",
    "bundled_embeddings",
    "check_safetensors",
    "from_kohya",
    "kohya_metadata",
    "load_embedding",
    "load_embeddings",
    "load_lora",
    "safe_torch_load",
    "save_embedding",
    "save_lora",
    "sd15_kohya_lora_names",
    "to_kohya",
    "unexpected_keys",
]
