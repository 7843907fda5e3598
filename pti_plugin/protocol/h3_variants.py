"""Hypothesis H3 on the toy world: the pivot-locality regulariser against the other LoRA variants.

H3 says the regulariser cuts *position leakage* at equal reconstruction, and so allows a higher
LoRA learning rate. For every (variant, weight, LoRA learning rate, training seed) cell,
:func:`run_h3` trains one LoRA stage from that seed's H1 pivot (:func:`~.h1_inversion.pivot_file`
at ``pivot_lr``) with the variant's regulariser (:data:`VARIANTS`) and measures it, with the same
sampling seeds in every cell so that cells compare paired:

- the **neutral** prompts of H1 (:func:`~.h1_inversion.neutral_records`: coarse look, graded
  appearance error, training-cell fraction, ...), pivot in the prompt, LoRA on;
- **drift** (PTI's locality): :data:`DRIFT_PROMPTS`, which do not name the pivot, generated with the
  LoRA on and by the base model (LoRA off) with the same sampling seeds; per image ``drift`` = 1 when
  the detected (shape, colour, cell) differ and ``drift_cell`` = 1 when the cell alone differs. The
  base model's images are the same for every cell: one part (:data:`BASE_DRIFT_PART`).

Each cell is a part (:class:`~.premise.Parts`), reused when its settings match: the grid resumes.
The statistics over cells are :mod:`.h3_summary`'s.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..toy_world.detectors import detect
from ..toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS
from ..toy_world.world import IMAGE_SIZE, bench_dataset
from .cell_archive import h3_cell_id, left_to_train
from .h1_inversion import NEUTRAL_KEYS, H1Settings, neutral_records, pivot_file
from .h2_runs import wait_for
from .premise import (Parts, encode_text, load_base, model_digest, neutral_prompts, preset_digest, run_preset, sample,
                      train_run)

#: The variants (name -> what regularises the LoRA). The pivot-locality ones take the base preset's
#: ``[plugins.pivot_locality]`` table with the class word and the weight of the cell.
VARIANTS = {
    "none": "no regulariser",
    "half_angle": "pivot locality at half the pivot->class angle (fractions [0.5], fixed)",
    "half_angle_band": "half_angle with its rows at the timesteps where the world decides positions (timestep_range)",
    "uniform_half": "pivot locality at a fraction uniform in [0.01, 0.5] of the angle",
    "class_endpoint": "pivot locality at the class prompt itself (fractions [1.0])",
    "reg_images": "kohya regularisation images of the class word, weighted by prior_loss_weight",
}
LOCALITY_VARIANTS = ("half_angle", "half_angle_band", "uniform_half", "class_endpoint")
#: Plugin options of ``uniform_half`` (the fixed-fraction variants are :func:`~pti_plugin.sweeps.bench.variant_preset`'s).
UNIFORM_HALF = {"fraction_sampling": "uniform", "min_fraction": 0.01, "max_fraction": 0.5}
#: ``timestep_range`` of ``half_angle_band``: where the shipped toy world decides an object's cell, the
#: share of images keeping the first prompt's cell going 0.1 -> 0.9 between t 926 and 790
#: (``analysis/position_timesteps.py``, ``analysis/results/research_protocol/position_timesteps.json``),
#: widened to the nearest tens.
POSITION_BAND = [780, 930]
PLUGIN = "pivot_locality"
#: Prompts that do not name the pivot (seed ``k`` uses prompt ``k mod 4``): what the LoRA should leave alone.
DRIFT_PROMPTS = ("a red square", "a green triangle at the top left", "a character", "a blue circle on a black background")
DRIFT_KEYS = ("drift", "drift_cell")
#: The part of the base model's drift images (LoRA off), shared by every cell.
BASE_DRIFT_PART = "h3-drift-base"


def _default_weights() -> dict[str, tuple[float | None, ...]]:
    """Two weights a variant, so that H1-H3 fit a night on 2 cores (README): pivot locality's preset
    weight and 10x it (weight 1 acted like no regulariser on this world: same highest safe rate, matched
    leakage -0.001 against none); kohya's default ``prior_loss_weight`` and 3x it."""
    locality = (10.0, 100.0)
    return {"none": (None,), "half_angle": locality, "half_angle_band": locality, "uniform_half": locality,
            "class_endpoint": locality,
            "reg_images": (1.0, 3.0)}


@dataclass(frozen=True)
class H3Settings:
    """The grid (variants x weights x LoRA learning rates x training seeds) and how each cell samples.

    ``weights[variant]``: the pivot-locality ``weight`` of a locality variant, the ``prior_loss_weight``
    of ``reg_images``, ``(None,)`` for ``none``. ``h1``/``pivot_lr``: the H1 grid and learning rate whose
    pivots the LoRAs start from. ``class_word``: the class of the regularisers (prompt and images)."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    weights: dict[str, tuple[float | None, ...]] = field(default_factory=_default_weights)
    #: From where the look is only partly learned (coarse 0.83-0.91 at 1e-5 without a regulariser, between
    #: the pivot's 0.62 and 1.00 at 1e-4) to where leakage is well outside the null (3e-3): the matched-
    #: reconstruction comparison reads measured points. At 1e-2 the layout collapses (README).
    lora_lrs: tuple[float, ...] = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    training_seeds: tuple[int, ...] = (42, 1, 2)
    h1: H1Settings = H1Settings()
    pivot_lr: float = 2.75e-5
    class_word: str = "character"
    reg_images: int = 12
    steps: int = 1000
    seeds: int = 64
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE

    @classmethod
    def quick(cls) -> H3Settings:
        """Two variants (a locality one and reg images), one weight, one rate, two seeds, one training step
        and four samples of one DDIM step, from the pivots of :meth:`H1Settings.quick` at its first rate (tests)."""
        h1 = H1Settings.quick()
        return cls(variants=("half_angle", "reg_images"), weights={"half_angle": (10.0,), "reg_images": (1.0,)},
                   lora_lrs=(1e-3,), training_seeds=(42, 1), h1=h1, pivot_lr=h1.inversion_lrs[0], reg_images=2,
                   steps=1, seeds=4, sample_steps=1)

    def sampling(self) -> dict:
        return {"seeds": self.seeds, "sample_steps": self.sample_steps, "guidance": self.guidance}

    def cells(self) -> list[tuple[str, float | None, float, int]]:
        """``(variant, weight, lr, training seed)`` of every cell."""
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown H3 variants {unknown}; choose among {list(VARIANTS)}")
        return [(variant, weight, lr, seed) for variant in self.variants for weight in self.weights[variant]
                for seed in self.training_seeds for lr in self.lora_lrs]


def drift_prompts(seeds: int) -> list[str]:
    """The drift prompt of each seed ``0..seeds-1`` (prompt ``k mod 4``)."""
    return [DRIFT_PROMPTS[k % len(DRIFT_PROMPTS)] for k in range(seeds)]


CLASS_PROMPT = DRIFT_PROMPTS.index("a character")


def drift_split(drift: list[int], drift_images: np.ndarray | None) -> dict[str, list[int]]:
    """Per-image ``drift`` split into the unrelated prompts' (``drift_unrelated``) and the class prompt's
    (``drift_class``, DreamBooth's class drift), and with the drift images (uint8 ``[seeds, 32, 32, 3]``,
    LoRA on) ``class_character``: whether each class-prompt image draws the trained character."""
    from ..toy_world.detectors import detect_character

    k = len(DRIFT_PROMPTS)
    out = {"drift_unrelated": [d for i, d in enumerate(drift) if i % k != CLASS_PROMPT],
           "drift_class": [d for i, d in enumerate(drift) if i % k == CLASS_PROMPT]}
    if drift_images is not None:
        out["class_character"] = [int(detect_character(img).is_character)
                                  for i, img in enumerate(drift_images) if i % k == CLASS_PROMPT]
    return out


def drift_records(on: np.ndarray, off: np.ndarray) -> dict[str, list[int]]:
    """Per image pair (uint8 ``[n, 32, 32, 3]`` each, ``on[k]`` and ``off[k]`` from one prompt and seed):
    ``drift`` (the detected shape, colour or cell differ) and ``drift_cell`` (the cell differs)."""
    out: dict[str, list[int]] = {key: [] for key in DRIFT_KEYS}
    pairs = zip(on.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3), off.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3), strict=True)
    for a, b in pairs:
        found_a, found_b = detect(a), detect(b)
        cell_a, cell_b = (found_a.row, found_a.col), (found_b.row, found_b.col)
        out["drift"].append(int((found_a.shape, found_a.colour, cell_a) != (found_b.shape, found_b.colour, cell_b)))
        out["drift_cell"].append(int(cell_a != cell_b))
    return out


def measure_base_drift(model: Path, settings: H3Settings) -> dict:
    """The base model (no LoRA, no pivot) on the drift prompts, sampling seeds ``0..seeds-1``."""
    base, pipe = load_base(model)
    cond = encode_text(base, drift_prompts(settings.seeds))
    return {"images_generated": sample(pipe, cond, encode_text(base, [""]), settings)}


def measure_cell(run_dir: Path, settings: H3Settings, base_drift: np.ndarray) -> dict:
    """The LoRA run in ``run_dir`` on the neutral prompts (pivot) and the drift prompts, against the
    base model's drift images ``base_drift`` (uint8 ``[seeds, 32, 32, 3]``)."""
    from ..metrics.run_model import load_run

    run = load_run(run_dir, device="cpu", class_word=settings.h1.init_word)
    with run.lora(True):
        uncond = run.encode([""])
        texts = neutral_prompts(run.pivot_text, settings.seeds)
        neutral = sample(run.pipe, run.encode(texts), uncond, settings)
        drifted = sample(run.pipe, run.encode(drift_prompts(settings.seeds)), uncond, settings)
    return (neutral_records(neutral, texts) | drift_records(drifted, base_drift)
            | {"images_generated": np.concatenate([neutral, drifted])})


def cell_preset(base_preset: dict, model: Path, data_dir: Path, settings: H3Settings, variant: str,
                weight: float | None, lr: float, seed: int, pivot: Path, reg_dir: Path | None) -> dict:
    """The trainer preset of one cell: one LoRA stage from ``pivot`` with the variant's regulariser."""
    from ..sweeps.bench import variant_preset

    stage = {"name": "lora", "kind": "lora", "steps": settings.steps, "learning_rate": lr, "unet_lr": lr}
    preset = run_preset(base_preset, model, data_dir, settings.h1.init_word, stage, pivot) | {"seed": seed}
    options = copy.deepcopy(base_preset.get("plugins", {}).get(PLUGIN, {})) | {"class_words": [settings.class_word]}
    if variant in LOCALITY_VARIANTS:
        options["weight"] = float(weight)
    preset["plugins"] = {PLUGIN: options}  # what variant_preset reads the plugin's options from
    if variant == "uniform_half":
        return preset | {"plugins": {PLUGIN: options | UNIFORM_HALF}}
    if variant == "half_angle_band":
        preset = variant_preset(preset, "half_angle", pivot, reg_dir)
        preset["plugins"][PLUGIN]["timestep_range"] = list(POSITION_BAND)
        return preset
    preset = variant_preset(preset, variant, pivot, reg_dir)
    if variant == "reg_images":
        preset["prior_loss_weight"] = float(weight)
    return preset


def cell_name(variant: str, weight: float | None, lr: float, seed: int) -> str:
    strength = "" if weight is None else f"-w{weight:g}"
    return f"h3-{variant}{strength}-lr{lr:g}-seed{seed}"


def reg_images_dir(model: Path, out: Path, settings: H3Settings) -> Path:
    """The kohya folder of ``settings.reg_images`` base-model images of the class word (one per model and
    sampling settings; made by :func:`make_reg_images`)."""
    key = {"model_digest": model_digest(model), "class_word": settings.class_word} | settings.sampling()
    return out / f"reg-{preset_digest(key)}"


def make_reg_images(reg_dir: Path, settings: H3Settings, run_dir: Path) -> Path:
    """``reg_dir``'s images, once, by :func:`~pti_plugin.sweeps.bench.generate_reg_images` from ``run_dir``."""
    from ..sweeps.bench import generate_reg_images

    sampling = SimpleNamespace(device="cpu", sample_steps=settings.sample_steps, guidance=settings.guidance)
    return generate_reg_images(run_dir, settings.class_word, reg_dir, settings.reg_images, sampling)


def run_h3(model: Path, out: Path, base_preset: dict, settings: H3Settings = H3Settings(),
           log: Callable[[str], None] = lambda text: print(text, flush=True),
           h1_out: Path | None = None, wait_seconds: float = 0.0, archive: Path | None = None) -> list[dict]:
    """Train and measure every cell under ``out``, except those the cell archive ``archive`` holds as
    measured and trained alike (:func:`~.cell_archive.left_to_train`; a part in ``out`` is reused first);
    the pivots are the H1 grid's under ``h1_out`` (default ``out``), waited for up to ``wait_seconds``.
    Returns the records of the cells measured or reused, each with ``variant``, ``weight``, ``lr``, ``seed``, ``steps``."""
    model, out = Path(model).resolve(), Path(out).resolve()
    h1_out = out if h1_out is None else Path(h1_out).resolve()
    data_dir = bench_dataset(out)
    parts = Parts(out, log, "h3")
    digest = model_digest(model)
    common = {"model_digest": digest} | settings.sampling()
    pivots = {s: pivot_file(model, h1_out, base_preset, settings.h1, settings.pivot_lr, s) for s in settings.training_seeds}
    reg_dir = reg_images_dir(model, out, settings)
    planned = []
    for cell in settings.cells():
        preset = cell_preset(base_preset, model, data_dir, settings, *cell, pivots[cell[3]], reg_dir)
        planned.append((cell, preset, common | {"preset": preset}))
    in_folder = {cell for cell, _, part in planned if parts.cached(cell_name(*cell), part) is not None}
    planned = left_to_train(planned, archive, h3_cell_id, lambda cell, part: cell in in_folder,
                            lambda text: log(f"h3: {text}"))
    fresh = [cell for cell, _, _ in planned if cell not in in_folder]  # to train
    base_drift = None
    if fresh:
        parts.get(BASE_DRIFT_PART, common | {"prompts": list(DRIFT_PROMPTS)}, lambda: measure_base_drift(model, settings))
        base_drift = np.load(out / "parts" / f"{BASE_DRIFT_PART}.npz")["images"]
    for seed in dict.fromkeys(cell[3] for cell in fresh):
        wait_for(pivots[seed], log, timeout_seconds=wait_seconds)
    if any(cell[0] == "reg_images" for cell in fresh):
        make_reg_images(reg_dir, settings, pivots[fresh[0][3]].parent)
    cells = []
    for (variant, weight, lr, seed), preset, part_settings in planned:
        name = cell_name(variant, weight, lr, seed)
        run_dir = out / "runs" / f"{name}-{preset_digest(preset | {'model_digest': digest})}"
        record = parts.get(name, part_settings, lambda: measure_cell(train_run(preset, run_dir, log, "h3"), settings, base_drift))
        cells.append(record | {"variant": variant, "weight": weight, "lr": lr, "seed": seed, "steps": settings.steps})
    return cells


CELL_NAME = re.compile(r"^h3-(?P<variant>[a-z_]+?)(?:-w(?P<weight>[0-9.e+-]+?))?-lr(?P<lr>[0-9.e+-]+)-seed(?P<seed>-?\d+)$")


def cell_key(name: str) -> tuple[str, float | None, float, int] | None:
    """``(variant, weight, lr, seed)`` of a part named by :func:`cell_name`, or None."""
    match = CELL_NAME.match(name)
    if match is None or match["variant"] not in VARIANTS:
        return None
    weight = None if match["weight"] is None else float(match["weight"])
    return match["variant"], weight, float(match["lr"]), int(match["seed"])


def load_h3_cells(out: Path, settings: H3Settings | None = None) -> list[dict]:
    """The measured cells under ``out`` (read only: unmeasured cells are left out), each with
    ``variant``, ``weight``, ``lr``, ``seed``, ``steps``: those of ``settings``' grid, or with
    ``settings=None`` every measured cell whatever grid it was run in (parts named by :func:`cell_name`)."""
    if settings is None:
        keys = sorted(filter(None, (cell_key(p.stem) for p in (Path(out) / "parts").glob("h3-*.json"))),
                      key=lambda k: (k[0], -1.0 if k[1] is None else k[1], k[2], k[3]))
        steps = H3Settings().steps
    else:
        keys, steps = settings.cells(), settings.steps
    cells = []
    for variant, weight, lr, seed in keys:
        path = Path(out) / "parts" / f"{cell_name(variant, weight, lr, seed)}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if all(key in record for key in NEUTRAL_KEYS + DRIFT_KEYS):
                cells.append(record | {"variant": variant, "weight": weight, "lr": lr, "seed": seed, "steps": steps})
    return cells
