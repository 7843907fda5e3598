"""The parts of a run's setup that are not its recipe (``trainer.py`` reads the recipe top to bottom): the
accelerator, from a fresh accelerate state; where the model's weights live and in what dtype (attention backend,
gradient checkpointing, the mixed-precision dtype, kohya's ``fp8_base``/``fp8_base_unet`` float8 weights, the VAE
once latents are cached); and the start-up block that says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .accelerator_options import accelerator_kwargs
from .config import Config
from .models.disk_mapping import map_frozen_to_disk
from .models.loading import configure_attention
from .models.trainable import FP8, TrainableModel
from .outputs import precision_dtype


def fresh_accelerate_state() -> None:
    """Forget accelerate's per-process singletons, so that a run that is not the first in this process (a
    sweep run in-process, a notebook's second ``Trainer(...).run()``) can ask for another ``mixed_precision``.
    Without it accelerate refuses: "AcceleratorState has already been initialized and cannot be changed".
    Called as a run sets up, not when it ends, so that a finished run's state stays usable."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_accelerator(config: Config, output_dir: Path, logging_dir: Path):
    """The run's ``Accelerator`` (after :func:`fresh_accelerate_state`): mixed precision, tracker, kohya's
    ``torch_compile``/``ddp_*`` options; on a machine without an accelerator device, a CPU one."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    fresh_accelerate_state()
    has_accelerator_device = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )
    return Accelerator(
        cpu=not has_accelerator_device,  # lets torchrun/accelerate launch on a CPU machine run MULTI_CPU (gloo)
        mixed_precision=config.mixed_precision, log_with=config.log_with or None, **accelerator_kwargs(config),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )


@dataclass
class Placement:
    """What :func:`place_model` and :func:`release_vae` did: the attention backend's name, the frozen weights'
    dtype, which of them float8 holds ("" for none; see :func:`float8_text`), and where the VAE went."""

    attention: str
    weight_dtype: torch.dtype
    float8: str = ""
    vae_offloaded: bool = False  # on the CPU until a sample needs its decoder
    vae_mapped: int = 0  # bytes of VAE weights mapped from a file


def place_model(config: Config, base, model: TrainableModel, device: torch.device, autocast) -> Placement:
    """Attention backend, gradient checkpointing, and every module on the device (frozen weights in the
    mixed-precision dtype, trainable tensors float32, or bf16 with full_bf16; float8 as kohya's fp8_base says)."""
    attention = configure_attention(base.unet, config.xformers, config.sdpa, device)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for te in base.text_encoders:
            # transformers >= 5 renamed it (the old name warns); both run the same checkpointing
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    weight_dtype = precision_dtype(config.mixed_precision)
    kept = model.kept_float32(config.full_bf16)
    stored = model.store_fp8(config.fp8_base, config.fp8_base_unet, autocast)
    trainable = kept | stored
    float8 = float8_text(config, [name for name, module in model.components().items()
                                  if any(id(p) in stored for p in module.parameters())])
    for module in model.components().values():
        for param in module.parameters():
            if id(param) not in trainable:
                param.data = param.data.to(weight_dtype)
        module.to(device)
    base.vae.to(device)
    return Placement(attention, weight_dtype, float8)


def float8_text(config: Config, components: list[str]) -> str:
    """``UNet linear/conv float8_e4m3fn (fp8_base_unet)``: the ``components`` whose weights
    :meth:`~.models.trainable.TrainableModel.store_fp8` stored in float8, and the key that asked; "" for none."""
    if not components:
        return ""
    encoders = sum(name != "unet" for name in components)
    names = (["UNet"] if "unet" in components else []) + (["text encoder" + "s" * (encoders > 1)] if encoders else [])
    key = "fp8_base_unet" if config.fp8_base_unet else "fp8_base"
    return f"{' and '.join(names)} linear/conv {str(FP8).removeprefix('torch.')} ({key})"


def release_vae(placement: Placement, vae: torch.nn.Module, latents_cached: bool, device: torch.device,
                output_dir: Path) -> None:
    """With cached latents every draw is served by the cache (pixel-changing augmentations are refused
    with it), so the VAE leaves the accelerator until a sample needs its decoder; on a CPU device its
    weights are mapped from a file instead."""
    placement.vae_offloaded = latents_cached and device.type != "cpu"
    if placement.vae_offloaded:
        vae.to("cpu")
    elif latents_cached:
        placement.vae_mapped = map_frozen_to_disk(vae, output_dir)


def announce(info: Callable[[str], None], config: Config, base, placement: Placement, device: torch.device, *,
             items: list, entries: list[int], processes: int, global_batch: int, frozen_text: list[str],
             trainable_dtype: torch.dtype, subsets: list, output_dir: Path) -> None:
    """The start-up block: model, data (``items``, the images; ``entries``, their indices with repeats), processes,
    device, output folder and sizes (:func:`sizes_text`), precision and what is cached (``frozen_text``: the stages
    whose text-encoder outputs the cache serves)."""
    info(
        f"model {base.source} ({base.family.name}, {base.prediction_type}); attention: {placement.attention}; "
        f"{len(items)} images, {len(entries)} entries with repeats; "
        f"{processes} process(es), global batch {global_batch}; device {device}"
    )
    info(f"output folder {output_dir}; {sizes_text(subsets, [items[i].bucket for i in entries])}")
    latents = "on disk and in memory" if config.cache_latents_to_disk else "in memory" if config.cache_latents else "off"
    texts = (("in stages " + ", ".join(map(repr, frozen_text)) if frozen_text else "asked, but every stage trains "
              "the text side (the pivot or a text-encoder LoRA), so none") if config.cache_text_encoder_outputs else "off")
    float8 = f", {placement.float8}" if placement.float8 else ""
    info(
        f"precision: {config.mixed_precision} (frozen weights {str(placement.weight_dtype).removeprefix('torch.')}"
        f"{float8}, trainable {str(trainable_dtype).removeprefix('torch.')}); gradient checkpointing "
        f"{'on' if config.gradient_checkpointing else 'off'}; cached: latents {latents}, text-encoder outputs {texts}"
    )
    if placement.vae_mapped:
        info(f"VAE weights ({placement.vae_mapped / 2**30:.2f} GiB) mapped from a file: latents are cached and "
             "the device is the CPU, so they leave process memory until a sample reads them")


#: At most this many bucket sizes are named in the start-up block (the rest counted).
NAMED_BUCKETS = 8


def sizes_text(subsets: list, buckets: list[tuple[int, int]]) -> str:
    """The subsets' resolutions and whether they bucket, and with buckets the sizes in use by ``buckets`` (one (w, h)
    per entry with repeats), each with its number of entries: ``resolution 512x512, buckets on: 2 in use (448x576 x2,
    512x512 x10)``."""
    resolutions = ", ".join(dict.fromkeys(f"{w}x{h}" for w, h in (s.resolution for s in subsets)))
    bucketing = [s.bucket_settings[0] for s in subsets]
    if not any(bucketing):
        return f"resolution {resolutions}, buckets off"
    counts = sorted(Counter(buckets).items())
    named = ", ".join(f"{w}x{h} x{n}" for (w, h), n in counts[:NAMED_BUCKETS])
    more = f", {len(counts) - NAMED_BUCKETS} more" if len(counts) > NAMED_BUCKETS else ""
    where = "" if all(bucketing) else " (in some subsets)"
    return f"resolution {resolutions}, buckets on{where}: {len(counts)} in use ({named}{more})"
