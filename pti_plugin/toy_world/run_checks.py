"""Whether a model or a run is a toy-world one, whose generations the toy world's detectors can read.

The toy world's scorers (the research bench, the model-internal metrics, the learning curves) read 32 px scenes
(:data:`~pti_plugin.toy_world.world.IMAGE_SIZE`) drawn by a toy-world-sized SD1.x model. A real SD1.5 or SDXL model or
run is refused before any training or scoring, naming the model, the size and the key: these checks read JSON files
and scan the training images, and load no model.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError
from ..metrics.run_model import find_run_files, read_run_config, training_items
from .world import IMAGE_SIZE


def generation_size_problem(run_dir: str | Path | None, output_name: str | None = None, config: Config | None = None
                            ) -> str | None:
    """Why the toy world's detectors cannot read the run's generations, else None: a run generates at its first
    training image's bucket (:meth:`~pti_plugin.metrics.run_model.LoadedRun.default_size`), and they read the toy
    world's ``IMAGE_SIZE`` px scenes only. Reads the run's config (unless ``config`` is given: ``run_dir`` may then be
    None) and scans its images; loads no model. None too when its images cannot be read: a run whose scores are all
    cached needs none, and loading the run names them."""
    config = read_run_config(find_run_files(run_dir, output_name)[0]) if config is None else config
    try:
        width, height = training_items(config)[0].bucket
    except ConfigError:  # the run's images moved or were deleted since it trained
        return None
    if (width, height) == (IMAGE_SIZE, IMAGE_SIZE):
        return None
    return (f"its generations are {width}x{height} px (its first training image's bucket), not the toy world's "
            f"{IMAGE_SIZE} px scenes that its detectors read: this command scores toy-world runs only (on your own "
            "model, analysis/position_leakage.py --run measures a run's position leakage)")


def toy_world_problem(config: Config) -> str | None:
    """Why the runs of ``config`` (a preset's, or a finished run's) are not toy-world runs, else None: their base
    model is not a toy-world model (:func:`~pti_plugin.script_args.sd15_folder_problem` with ``IMAGE_SIZE``: another
    family's, or one drawing another size, e.g. a real SD1.5 trained at 32 px, whose toy-world scores are all 0), or
    their generations are not ``IMAGE_SIZE`` px (:func:`generation_size_problem`). Each reason names the model, the
    size and the key. Reads JSON files and scans the training images; loads no model. A model that is not there is
    left to the loader (a run whose scores are cached needs none)."""
    from ..models.loading import resolve_model_path
    from ..script_args import sd15_folder_problem

    value = config.pretrained_model_name_or_path
    model = resolve_model_path(value)
    if model.exists() and (problem := sd15_folder_problem(model, IMAGE_SIZE)):
        return f"pretrained_model_name_or_path {value}: {problem}"
    if problem := generation_size_problem(None, config=config):
        size = "x".join(map(str, config.resolution)) if isinstance(config.resolution, list) else config.resolution
        return f"resolution {size} (model {value}): {problem}"
    return None
