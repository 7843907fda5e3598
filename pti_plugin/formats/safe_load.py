"""The safe loader under its earlier path: it lives in :mod:`pti_plugin.safe_load` (a leaf that model loading and
the formats both read through), re-exported here so that ``pti_plugin.formats.safe_load`` imports keep working."""

from ..safe_load import (
    ALLOWED,
    DTYPE_BYTES,
    BadSafetensorsError,
    ModelCheckpointModuleStandIn,
    ModelCheckpointStandIn,
    UnreadableFileError,
    UnsafeFileError,
    check_pytorch_framing,
    check_safetensors,
    load_safetensors,
    safe_torch_load,
)

__all__ = [
    "ALLOWED",
    "DTYPE_BYTES",
    "BadSafetensorsError",
    "ModelCheckpointModuleStandIn",
    "ModelCheckpointStandIn",
    "UnreadableFileError",
    "UnsafeFileError",
    "check_pytorch_framing",
    "check_safetensors",
    "load_safetensors",
    "safe_torch_load",
]
