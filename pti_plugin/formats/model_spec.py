"""The SAI model spec (``modelspec.*`` safetensors metadata) as kohya sd-scripts writes it into a LoRA and an embedding.

kohya (``library/sai_model_spec.py``, ``train_util.get_sai_model_spec``) writes into every saved LoRA
(``train_network.py``) and every saved textual-inversion embedding (``train_textual_inversion.py``), the
intermediate saves included: the spec's version, the architecture (the base model's, then ``/lora`` or
``/textual-inversion``), the implementation, the title (``metadata_title``, else ``output_name``), the
training resolution ``WxH`` and the date (ISO 8601, local time, whole seconds); then ``modelspec.author``,
``.description``, ``.license``, ``.tags``, ``.usage_hint``, ``.merged_from``, ``.trigger_phrase``, ``.preprocessor``
and ``.is_negative_embedding`` (``metadata_*``) only when given, each as given (tags: one comma-separated string,
as kohya), and ``.thumbnail`` (``metadata_thumbnail``): an image file as a data URL (:func:`thumbnail_data_url`); pti-plugin's trigger phrase defaults to the pivot token (``outputs.py``; kohya has no default). kohya's
``prediction_type``, ``encoder_layer`` (``clip_skip``), ``timestep_range`` and ``implementation_version`` (its git
commit) are not written here.
"""

from __future__ import annotations

import base64
import datetime
import io
import mimetypes
from collections.abc import Mapping
from pathlib import Path

SPEC_VERSION = "1.0.1"
#: The base model's architecture by model family (kohya's ``ARCH_SD_V1``, ``ARCH_SD_XL_V1_BASE``).
ARCHITECTURES = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
#: The adapter suffix of the architecture by file kind.
ADAPTERS = {"lora": "lora", "embedding": "textual-inversion"}
_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
#: kohya's ``determine_implementation``: an SDXL LoRA and any embedding name Stability AI's code, an SD1.x LoRA diffusers.
IMPLEMENTATIONS = {("lora", "sd15"): "diffusers", ("lora", "sdxl"): _STABILITY_AI,
                   ("embedding", "sd15"): _STABILITY_AI, ("embedding", "sdxl"): _STABILITY_AI}
#: The ``metadata_*`` options written only when given, by their ``modelspec.*`` field: kohya's standard four, then
#: those kohya writes as given from any other ``metadata_<field>`` option (``thumbnail``: the data URL of
#: ``metadata_thumbnail``'s file, :func:`thumbnail_data_url`).
OPTIONAL_FIELDS = ("author", "description", "license", "tags",
                   "usage_hint", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding", "thumbnail")


def thumbnail_data_url(value: str) -> str:
    """kohya's ``modelspec.thumbnail`` of ``metadata_thumbnail`` (``sai_model_spec.file_to_data_url``): a value
    starting ``data:`` as given, else the image file's bytes as ``data:<MIME type>;base64,<base64>`` (the type guessed
    from the file name, ``application/octet-stream`` when unknown). Raises ValueError naming the file when it is
    missing, unreadable or not an image (kohya warns and leaves the field out)."""
    if value.startswith("data:"):
        return value
    path = Path(value).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the thumbnail image {path.resolve()}: {exc.strerror or exc}") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path.resolve()} is not a readable image: {exc}") from None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def model_spec_metadata(
    kind: str, family: str, title: str, resolution: int | list[int] | tuple[int, int], timestamp: float,
    given: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The ``modelspec.*`` entries of a ``kind`` file (``"lora"`` or ``"embedding"``) for a model ``family``
    (``"sd15"``, ``"sdxl"``): ``title``; ``resolution`` an int or (width, height); ``timestamp`` a Unix time (the
    date). ``given``: :data:`OPTIONAL_FIELDS` values, None where not given."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": f"{ARCHITECTURES[family]}/{ADAPTERS[kind]}",
        "modelspec.implementation": IMPLEMENTATIONS[(kind, family)],
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
    }
    for name in OPTIONAL_FIELDS:
        value = (given or {}).get(name)
        if value is not None:
            meta[f"modelspec.{name}"] = value
    return meta


__all__ = ["ADAPTERS", "ARCHITECTURES", "IMPLEMENTATIONS", "OPTIONAL_FIELDS", "SPEC_VERSION", "model_spec_metadata",
           "thumbnail_data_url"]
