"""Preview a dataset exactly as training will see it, before spending GPU hours.

    python -m pti_plugin.dataset_preview --preset my.toml [--dataset_config data.toml] [--n 20]
        [--stage 0] [--num_processes 1] [--save_images DIR] [--tags 40] [--KEY VALUE ...]

Prints, for the first ``n`` samples of a stage (in the order the training loop draws them: step by
step, slot by slot of the global batch), the final caption after every transformation, the
bucket, the repeats, whether it is a regularisation image and its augmentation; then per-subset
counts, the tag-frequency table (the same table the LoRA's ``ss_tag_frequency`` metadata holds)
and what the trainer does to the captions. It loads no model and looks for none (the model path, the
starting files, a state, the sample prompts and the output folder are not checked; the captions need no
tokenizer: only training counts their tokens). Every draw goes through
:func:`pti_plugin.data.samples.draw_sample`, the function the training loop calls, so the
captions are the ones training feeds the text encoder for the same seed. The global batch depends
on the number of processes (``--num_processes``, default 1). ``--save_images DIR`` also writes the
augmented pixels of each sample as PNG files (``stepSSSSS_slotBBB.png``) and, for an image with a loss mask
(``alpha_mask``, ``masked_loss``), the mask as training fits it to those pixels (bucket resize, crop, flip; before the
area downsampling to the latent's size) beside it as ``stepSSSSS_slotBBB-mask.png`` (8-bit greyscale, 255 = weight 1).

Other ``--KEY VALUE`` arguments override preset keys as on the training command line; an explicit
``--dataset_config`` replaces the preset's ``train_data_dir`` / ``reg_data_dir`` / ``in_json``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import EMBEDDED, Config, ConfigError
from .config_loading import load_config

@dataclass
class PreviewSample:
    """One previewed sample (what the loop feeds for this step and slot)."""

    step: int
    slot: int
    epoch: int
    image: Path
    subset: str
    caption: str
    bucket: tuple[int, int]
    repeats: int
    is_reg: bool
    augmentation: str


@dataclass
class Preview:
    """The preview of a dataset: samples, per-subset counts, tag frequency and start-up notes."""

    stage_index: int
    global_batch: int
    steps_per_epoch: int
    samples: list[PreviewSample]
    subsets: list[dict[str, Any]]
    tag_frequency: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)


def _training_items(config: Config, log_notes: bool):
    from .data.dataset import load_subsets
    from .data.scanning import scan_images_and_held_out

    train_dir = None
    if config.train_data_dir == EMBEDDED:
        from .embedded_default import default_dataset_dir

        train_dir = default_dataset_dir(config.token_string)
    return scan_images_and_held_out(config, load_subsets(config, train_dir), log_notes=log_notes)


def preview_dataset(
    config: Config, n: int = 20, stage_index: int = 0, num_processes: int = 1, save_images: str | Path | None = None,
) -> Preview:
    """The first ``n`` samples of stage ``stage_index`` as the training loop draws them, and the dataset's tables."""
    from .data.masks import pixels_and_mask
    from .data.dataset_stats import dataset_notes, subset_counts, tag_frequency
    from .data.sample_order import stage_order
    from .data.samples import draw_sample
    from .data.scanning import build_entries

    if not 0 <= stage_index < len(config.stages):
        raise ConfigError(f"--stage {stage_index}: the preset has {len(config.stages)} stage(s)")
    if num_processes < 1 or n < 0:
        raise ConfigError("--num_processes must be >= 1 and --n >= 0")
    items, held_out = _training_items(config, log_notes=False)
    entries = build_entries(items)
    global_batch = config.train_batch_size * num_processes * config.gradient_accumulation_steps
    stage = config.stages[stage_index]
    order = stage_order(config, stage_index, [items[i].bucket for i in entries], global_batch)
    if order.steps is None:  # an epoch-based stage (the token warm-up's fraction is of its steps)
        order.steps = stage.max_train_epochs * order.batches_per_epoch
    out_dir = Path(save_images) if save_images else None
    if out_dir is not None:
        if problem := _save_folder_problem(config, items, out_dir):
            raise ConfigError(f"--save_images {out_dir}: {problem}")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--save_images {out_dir}: cannot be created ({exc.strerror})") from None
    samples: list[PreviewSample] = []
    step = 0
    while len(samples) < n:
        for slot in range(global_batch):
            if len(samples) >= n:
                break
            sample = draw_sample(items, entries, order, config.seed, stage_index, step, slot,
                                 config.token_string, config.num_vectors_per_token)
            item = items[sample.item_index]
            samples.append(PreviewSample(step, slot, sample.epoch, item.path, item.subset_name, sample.caption,
                                         item.bucket, item.num_repeats, item.is_reg, sample.augmentation.describe()))
            if out_dir is not None:
                _save_pngs(*pixels_and_mask(item, sample.augmentation), out_dir / f"step{step:05d}_slot{slot:03d}")
        step += 1
    return Preview(stage_index, global_batch, order.batches_per_epoch, samples, subset_counts(items),
                   tag_frequency(items), dataset_notes(items, config.token_string, held_out))


def _save_folder_problem(config: Config, items, folder: Path) -> str | None:
    """Why ``folder`` cannot take the previewed images, else None: it is a folder training reads images from (the
    previews would be trained on), or a folder directly in ``train_data_dir``/``reg_data_dir``
    (read there as a ``<repeats>_<name>`` subset)."""
    folder = folder.expanduser().resolve()
    if folder in {item.path.parent.resolve() for item in items}:
        return "it holds the dataset's images: training would read the previews written there as images of the dataset"
    for key in ("train_data_dir", "reg_data_dir"):
        root = getattr(config, key)
        if root and root != EMBEDDED and folder.parent == Path(root).expanduser().resolve():
            return f"it lies directly in {key} {root}, where training reads every <repeats>_<name> folder as images"
    return None


def _save_pngs(pixels, mask, stem: Path) -> None:
    """``<stem>.png``: the pixels ([3, H, W] in [-1, 1]); ``<stem>-mask.png``: the fitted loss mask ([H, W] in [0, 1],
    the 8-bit values it was read from), when there is one."""
    import numpy as np
    from PIL import Image

    array = ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(array).save(stem.with_name(f"{stem.name}.png"))
    if mask is not None:
        Image.fromarray((mask.numpy() * 255.0).round().clip(0, 255).astype(np.uint8)).save(
            stem.with_name(f"{stem.name}-mask.png"))


def render(preview: Preview, config: Config, max_tags: int = 40) -> str:
    """The preview as the text the command prints."""
    stage = config.stages[preview.stage_index]
    lines = [
        f"stage {preview.stage_index} {stage.name!r}: seed {config.seed}, global batch {preview.global_batch}, "
        f"{preview.steps_per_epoch} step(s) per epoch",
        "",
        f"{'step':>5} {'slot':>4} {'epoch':>5}  {'reg':3}  {'bucket':9}  {'repeats':>7}  {'augment':16}  image: caption",
    ]
    for s in preview.samples:
        bucket = f"{s.bucket[0]}x{s.bucket[1]}"
        lines.append(f"{s.step:>5} {s.slot:>4} {s.epoch:>5}  {'reg' if s.is_reg else '-':3}  {bucket:9}  {s.repeats:>7}  "
                     f"{s.augmentation:16}  {s.subset}/{s.image.name}: {s.caption}")
    lines += ["", "subsets (repeats and entries after kohya's reg balancing):",
              f"  {'dataset':>7}  {'reg':3}  {'images':>6}  {'repeats':>7}  {'entries/epoch':>13}  subset"]
    for row in preview.subsets:
        lines.append(f"  {row['dataset']:>7}  {'reg' if row['is_reg'] else '-':3}  {row['images']:>6}  "
                     f"{str(row['repeats']):>7}  {row['entries']:>13}  {row['subset']}")
    train = sum(r["entries"] for r in preview.subsets if not r["is_reg"])
    reg = sum(r["entries"] for r in preview.subsets if r["is_reg"])
    lines.append(f"  entries per epoch: {train} training + {reg} regularisation")
    lines += ["", "tag frequency (ss_tag_frequency):"]
    for name, counts in preview.tag_frequency.items():
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{tag} ({count})" for tag, count in ranked[:max_tags])
        more = f", ... and {len(ranked) - max_tags} more" if len(ranked) > max_tags else ""
        lines.append(f"  {name}: {shown}{more}")
    if preview.notes:
        lines += ["", "what the trainer does to the captions:"] + [f"  {note}" for note in preview.notes]
    return "\n".join(lines)


def _split_own_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own = {"n": "20", "stage": "0", "num_processes": "1", "save_images": "", "tags": "40"}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key = argv[i][2:].partition("=")[0] if argv[i].startswith("--") else ""
        if key in own:
            if "=" in argv[i]:
                own[key] = argv[i].partition("=")[2]
            elif i + 1 < len(argv):
                i += 1
                own[key] = argv[i]
            else:
                raise ConfigError(f"--{key} needs a value")
        else:
            rest.append(argv[i])
        i += 1
    return own, rest


def _load(argv: list[str]) -> Config:
    """The config of the preview's command line (its own flags taken out): no model, starting file, prompt or output
    folder is looked for (``data_only``, which also leaves a GPU-only precision, fp16 in the shipped presets,
    unchecked); an explicit ``--dataset_config`` replaces the preset's image folders, as in training
    (:func:`~pti_plugin.config_loading.load_config`)."""
    from .command_line import parse_args

    return load_config(*parse_args(argv), data_only=True)


def main(argv: list[str] | None = None, config: Config | None = None) -> int:
    """Print the preview; returns the exit code (2 for configuration and caption errors). ``config``: the config of
    ``argv``, already loaded (``train_pti.py --debug_dataset``): not loaded again, so each warning is said once."""
    from .data.captions import CaptionError
    from .script_args import out_folder_problem

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        own, rest = _split_own_flags(argv)
        config = _load(rest) if config is None else config
        try:
            n, stage, processes, max_tags = int(own["n"]), int(own["stage"]), int(own["num_processes"]), int(own["tags"])
        except ValueError as exc:
            raise ConfigError(f"--n, --stage, --num_processes and --tags take integers ({exc})") from None
        if max_tags < 0:
            raise ConfigError(f"--tags must be >= 0 (tags shown per subset), got {max_tags}")
        if own["save_images"] and (problem := out_folder_problem(Path(own["save_images"]))):
            raise ConfigError(f"--save_images {own['save_images']}: {problem}")
        preview = preview_dataset(config, n, stage, processes, own["save_images"] or None)
    except (ConfigError, CaptionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(preview, config, max_tags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
