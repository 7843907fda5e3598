"""Measurements of a PTI run (docs/method.md, "The measurements"): reconstruction, editability, subject localisation,
position leakage, and how far the run moved.

Modules (one concept each):

- :mod:`.run_model` — :func:`load_run`: a finished run (its resolved config, base model, LoRA and
  pivot) as a diffusers pipeline whose LoRA can be switched off to get the base model;
- :mod:`.prompts` — the default prompt sets and the subject's token positions;
- :mod:`.attention_capture` — :func:`capture_cross_attention`: records the UNet's cross-attention
  probabilities for chosen tokens, leaving the UNet's output bit-identical;
- :mod:`.localisation` — heatmaps of the subject in generated and training images, centroid and spread;
- :mod:`.leakage` — layout diversity, attraction to the training layouts, the leakage score;
- :mod:`.clip_scores` — CLIP embeddings from a LOCAL model folder (``clip_model_path``);
- :mod:`.probes` — fixed noised training latents for the model-internal proxies;
- :mod:`.reconstruction` — ``clip_image_image`` or, without CLIP, ``proxy_denoise_mse``;
- :mod:`.editability` — ``clip_text_image`` or, without CLIP, ``proxy_edit_direction_cos``;
- :mod:`.movement` — output-space angles of the pivot, LoRA weight-change norm;
- :mod:`.knee` — the knee of a sampled curve (maximum distance to the chord);
- :mod:`.curves` — shapes of replicated curves: knees, breakpoints, half-way times, values at matched x;
- :mod:`.replication` — intervals for replicated experiments (a two-level bootstrap over training and sampling seeds);
- :mod:`.correlation` — Pearson and Spearman agreement of two measurements of the same runs;
- :mod:`.evaluate` — :func:`evaluate_run`: everything the LR sweep records for one run.

Names starting with ``proxy_`` are model-internal stand-ins used when no CLIP model is given;
they rank runs of one model and data set, and are not comparable with the CLIP scores.
"""

from .attention_capture import TokenAttentionCollector, capture_cross_attention
from .editability import measure_editability
from .evaluate import evaluate_run
from .knee import knee_index
from .leakage import LeakageMeasurement, layout_distance_matrix, leakage_score, measure_position_leakage
from .localisation import HeatmapStats, generate_images, generate_with_heatmaps, heatmap_stats, training_heatmaps
from .movement import lora_delta_norm, output_space_angles
from .reconstruction import measure_reconstruction
from .run_model import LoadedRun, load_run

__all__ = [
    "HeatmapStats",
    "LeakageMeasurement",
    "LoadedRun",
    "TokenAttentionCollector",
    "capture_cross_attention",
    "evaluate_run",
    "generate_images",
    "generate_with_heatmaps",
    "heatmap_stats",
    "knee_index",
    "layout_distance_matrix",
    "leakage_score",
    "load_run",
    "lora_delta_norm",
    "measure_editability",
    "measure_position_leakage",
    "measure_reconstruction",
    "output_space_angles",
    "training_heatmaps",
]
