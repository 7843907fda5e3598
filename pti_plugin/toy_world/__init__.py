"""A synthetic "toy world" and a tiny text-to-image model trained on it (loads like SD1.5).

- :mod:`.world`: scenes, rendering, captions, the PTI character and its fine-tuning folder;
- :mod:`.detectors`: ground-truth readers of colour, shape, position and background;
- :mod:`.train_recipe`: the from-scratch training recipe (``python -m pti_plugin.toy_world.train_recipe``),
  with its settings in :mod:`.recipe_config` and its VAE stage in :mod:`.recipe_vae`;
- :mod:`.run_scores`: the ground-truth scorer of a training run (the research bench's, :mod:`pti_plugin.sweeps.bench`).

The research protocol measured on this world is :mod:`pti_plugin.protocol`, above it: the world imports nothing from
the protocol, the sweeps, the command line or the trainer.

:data:`WEIGHTS_DIR` is the shipped diffusers folder (``StableDiffusionPipeline.from_pretrained``).
"""

from ..models.tiny import SHIPPED_WEIGHTS as WEIGHTS_DIR  # the folder's one definition (what @embedded loads)
from .detectors import Detection, detect
from .world import Scene, make_caption, parse_caption, render_scene, sample_scene, write_character_dataset

__all__ = [
    "WEIGHTS_DIR",
    "Detection",
    "Scene",
    "detect",
    "make_caption",
    "parse_caption",
    "render_scene",
    "sample_scene",
    "write_character_dataset",
]
