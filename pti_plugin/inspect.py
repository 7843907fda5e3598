"""``python -m pti_plugin.inspect FILE``: what a LoRA or embedding file holds, checked against SD1.5 or SDXL.

Prints the detected format and model family (SDXL when its keys fit SDXL's kohya names better, or it
holds an SDXL ``clip_l``/``clip_g`` embedding), LoRA rank(s) and alpha(s), the family's modules
covered, bundled embeddings, the header metadata, and every key that no module of that family would
take (AUTOMATIC1111 logs those only at debug level, so a broken LoRA fails silently there), and the tensors holding
NaN or infinite values. Exit status: 0 when every key fits, 1 when some key does not, the format is unknown (an
empty file included) or a tensor is not finite, 2 when the file cannot be read.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic_io import non_finite_keys
from .formats.embedding import EmbeddingFormatError, bundled_embedding_parts, load_embeddings
from .formats.file_family import FILE_FAMILIES, file_family, file_formats, foreign_file_hint, text_encoder_names
from .formats.kohya_lora import BUNDLE_PREFIX, load_lora, unexpected_keys
from .models.family import STANDALONE_KEY, TEXT_ENCODER_PREFIX, UNET_PREFIX, EmbeddingLayout, KeyTable
from .safe_load import BadSafetensorsError, UnsafeFileError, safe_torch_load
from .script_args import argument_parser

_MAX_VALUE_CHARS = 160


def _counts(values: list[Any]) -> str:
    counted = Counter(values)
    if len(counted) == 1:
        return str(next(iter(counted)))
    return ", ".join(f"{value} ({n} modules)" for value, n in sorted(counted.items(), key=lambda kv: -kv[1]))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _coverage(modules: set[str], table: KeyTable) -> str:
    """``UNet attention a/A, UNet conv (LoCon) c/C, text encoder t/T`` (``text encoder 1``/``2`` for two)."""
    attention = table.names(["unet"])
    parts = [f"UNet attention {len(modules & attention)}/{len(attention)}"]
    conv = table.names(["unet"], conv=True) - attention
    parts.append(f"UNet conv (LoCon) {len(modules & conv)}/{len(conv)}")
    encoders = text_encoder_names(table)
    for i, component in enumerate(encoders):
        names = table.names([component])
        label = "text encoder" if len(encoders) == 1 else f"text encoder {i + 1}"
        parts.append(f"{label} {len(modules & names)}/{len(names)}")
    return "LoRA modules: " + ", ".join(parts)


def _describe_lora(tensors: Mapping[str, torch.Tensor], table: KeyTable, layout: EmbeddingLayout) -> list[str]:
    modules = {k.split(".", 1)[0] for k in tensors if k.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX))}
    downs = [tensors[f"{m}.lora_down.weight"] for m in sorted(modules) if f"{m}.lora_down.weight" in tensors]
    alphas = [round(float(tensors[f"{m}.alpha"].item()), 6) for m in sorted(modules) if f"{m}.alpha" in tensors]
    lines = [
        _coverage(modules, table),
        f"rank: {_counts([d.shape[0] for d in downs]) if downs else '-'}",
        f"alpha: {_counts(alphas) if alphas else 'none stored (= rank)'}",
        f"dtype: {_counts([_dtype(d) for d in downs]) if downs else '-'}",
    ]
    described = []
    order = {part: i for i, part in enumerate(layout.bundle_keys)}  # the family's encoder order first
    for name, parts in bundled_embedding_parts(tensors).items():
        shown = [f"{list(t.shape)} {_dtype(t)}" if len(parts) == 1 else f"{part} {list(t.shape)} {_dtype(t)}"
                 for part, t in sorted(parts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))]
        described.append(f"{name} " + " + ".join(shown))
    lines.append("bundled embeddings: " + (", ".join(described) or "none"))
    return lines


def _describe_embedding(path: Path, family: str, tensors: Mapping[str, torch.Tensor] | None, raw: Any) -> list[str]:
    """The format and vector lines of an embedding file (raises ``EmbeddingFormatError`` when it is none)."""
    _, layout = file_formats(family)
    # the file as describe read it, not read again
    vectors = load_embeddings(path, layout, contents=tensors if path.suffix == ".safetensors" else raw)
    if len(vectors) > 1:
        kind = " + ".join(layout.standalone_keys)
        shapes = ", ".join(f"{key} {v.shape[0]} x {v.shape[1]} {_dtype(v)}" for key, v in zip(layout.standalone_keys, vectors))
        return [f"format: textual-inversion embedding ({FILE_FAMILIES[family]} {kind})", f"vectors: {shapes}"]
    (v,) = vectors
    kind = "A1111 .pt (string_to_param)" if isinstance(raw, Mapping) and "string_to_param" in raw else "single tensor"
    if tensors is not None and STANDALONE_KEY in tensors:
        kind = f"standalone {STANDALONE_KEY}"
    return [f"format: textual-inversion embedding ({kind})",
            f"vectors: {v.shape[0]} x {v.shape[1]} {_dtype(v)}" + ("" if v.shape[1] == 768 else " (SD1.5 takes 768)")]


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
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; pass a LoRA or embedding file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    tensors, metadata, raw = _tensor_dict(path)
    family = file_family(tensors) if tensors is not None else "sd15"
    table, layout = file_formats(family)
    lines = [f"file: {path}"]
    if tensors is not None and any(k.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX, BUNDLE_PREFIX)) for k in tensors):
        lines.append(f"format: kohya LoRA ({FILE_FAMILIES[family]} key map)")
        lines += _describe_lora(tensors, table, layout)
        bad = unexpected_keys(tensors, table=table)
    else:
        try:
            lines += _describe_embedding(path, family, tensors, raw)
            bad = []
        except EmbeddingFormatError:
            empty = " (the file holds no tensors)" if tensors == {} else ""
            lines.append(f"format: unknown (neither a kohya LoRA nor an embedding){empty}")
            bad = sorted(tensors) if tensors is not None else [f"<{type(raw).__name__} object>"]
    lines += _describe_metadata(metadata)
    lines.append(f"keys no {FILE_FAMILIES[family]} module would take: {len(bad) or 'none'}")
    lines += [f"  {key}" for key in bad]
    hint = foreign_file_hint(tensors, family).removeprefix("; ") if bad and tensors else ""
    lines += [f"note: {hint}"] if hint else []
    broken = non_finite_keys(tensors) if tensors is not None else []
    if broken:
        lines += [f"tensors holding NaN or infinite values: {len(broken)}"] + [f"  {key}" for key in broken]
    return lines, 1 if bad or broken or tensors == {} else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the report for each FILE; the exit status is the worst of them."""
    parser = argument_parser(prog="python -m pti_plugin.inspect", description=__doc__.splitlines()[0])
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
