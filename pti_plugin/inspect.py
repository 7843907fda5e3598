"""``python -m pti_plugin.inspect FILE``: what a LoRA or embedding file holds, checked against SD1.5.

Prints the detected format, LoRA rank(s) and alpha(s), the SD1.5 modules covered, bundled
embeddings, the header metadata, and every key that no SD1.5 module would take (AUTOMATIC1111 logs
those only at debug level, so a broken LoRA fails silently there). Exit status: 0 when every key
fits, 1 when some key does not or the format is unknown, 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .formats.embedding import EmbeddingFormatError, bundled_embeddings, load_embedding
from .formats.kohya_lora import (
    BUNDLE_PREFIX,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    load_lora,
    sd15_kohya_lora_names,
    unexpected_keys,
)
from .formats.safe_load import BadSafetensorsError, UnsafeFileError, safe_torch_load

_MAX_VALUE_CHARS = 160


def _counts(values: list[Any]) -> str:
    counted = Counter(values)
    if len(counted) == 1:
        return str(next(iter(counted)))
    return ", ".join(f"{value} ({n} modules)" for value, n in sorted(counted.items(), key=lambda kv: -kv[1]))


def _describe_lora(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    modules = {k.split(".", 1)[0] for k in tensors if k.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX))}
    attention = sd15_kohya_lora_names(text_encoder=False)
    conv = sd15_kohya_lora_names(text_encoder=False, conv=True) - attention
    text = sd15_kohya_lora_names() - attention
    downs = [tensors[f"{m}.lora_down.weight"] for m in sorted(modules) if f"{m}.lora_down.weight" in tensors]
    alphas = [round(float(tensors[f"{m}.alpha"].item()), 6) for m in sorted(modules) if f"{m}.alpha" in tensors]
    lines = [
        f"LoRA modules: UNet attention {len(modules & attention)}/{len(attention)}, "
        f"UNet conv (LoCon) {len(modules & conv)}/{len(conv)}, text encoder {len(modules & text)}/{len(text)}",
        f"rank: {_counts([d.shape[0] for d in downs]) if downs else '-'}",
        f"alpha: {_counts(alphas) if alphas else 'none stored (= rank)'}",
        f"dtype: {_counts([str(d.dtype).removeprefix('torch.') for d in downs]) if downs else '-'}",
    ]
    bundled = bundled_embeddings(tensors)
    described = [f"{n} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for n, v in bundled.items()]
    lines.append("bundled embeddings: " + (", ".join(described) or "none"))
    return lines


def _describe_metadata(metadata: Mapping[str, str]) -> list[str]:
    if not metadata:
        return ["metadata: none"]
    lines = ["metadata:"]
    for key in sorted(metadata):
        value = metadata[key]
        if len(value) > _MAX_VALUE_CHARS:
            value = f"{value[:_MAX_VALUE_CHARS]}... ({len(value)} chars)"
        lines.append(f"  {key}: {value}")
    return lines


def _tensor_dict(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, str], Any]:
    """(tensors when the file is a flat name -> tensor mapping, metadata, the raw pickled object)."""
    if path.suffix == ".safetensors":
        tensors, metadata = load_lora(path)
        return tensors, metadata, None
    data = safe_torch_load(path)
    if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return dict(data), {}, data
    return None, {}, data


def describe(path: str | Path) -> tuple[list[str], int]:
    """The report lines for ``path`` and the exit status (see the module docstring)."""
    path = Path(path)
    tensors, metadata, raw = _tensor_dict(path)
    lines = [f"file: {path}"]
    if tensors is not None and any(k.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX, BUNDLE_PREFIX)) for k in tensors):
        lines.append("format: kohya LoRA (SD1.5 key map)")
        lines += _describe_lora(tensors)
        bad = unexpected_keys(tensors)
    else:
        try:
            vectors = load_embedding(path)
        except EmbeddingFormatError:
            lines.append("format: unknown (neither a kohya LoRA nor an embedding)")
            bad = sorted(tensors) if tensors is not None else [f"<{type(raw).__name__} object>"]
        else:
            kind = "A1111 .pt (string_to_param)" if isinstance(raw, Mapping) and "string_to_param" in raw else "single tensor"
            if tensors is not None and "emb_params" in tensors:
                kind = "standalone emb_params"
            lines.append(f"format: textual-inversion embedding ({kind})")
            lines.append(f"vectors: {vectors.shape[0]} x {vectors.shape[1]} {str(vectors.dtype).removeprefix('torch.')}"
                         + ("" if vectors.shape[1] == 768 else " (SD1.5 takes 768)"))
            bad = []
    lines += _describe_metadata(metadata)
    lines.append(f"keys no SD1.5 module would take: {len(bad) or 'none'}")
    lines += [f"  {key}" for key in bad]
    return lines, 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the report for each FILE; the exit status is the worst of them."""
    parser = argparse.ArgumentParser(prog="python -m pti_plugin.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    status = 0
    for file in args.files:
        try:
            lines, code = describe(file)
        except (OSError, BadSafetensorsError, UnsafeFileError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        print("\n".join(lines))
        status = max(status, code)
    return status


if __name__ == "__main__":
    sys.exit(main())
