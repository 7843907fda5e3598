"""Hypothesis H1 on the toy world: what an inversion gains in reconstruction and loses in editability
as its pivot moves away from the init word (the research protocol's inversion sweep).

For every (learning rate, training seed, vectors) cell of the grid, :func:`run_h1` trains one
inversion with the project's trainer (from the init word, the character set, ``steps`` steps) and
measures its fine-tuned model (pivot in the prompt) on two fixed prompt sets, with the same sampling
seeds in every cell so that cells compare paired:

- **neutral** prompts (:func:`~.premise.neutral_prompts`: no position asked, seed ``k`` uses
  template ``k mod 4``): per image the character's coarse look, its private dot, the graded
  appearance error, whether an object is found and whether it sits in a training cell;
- **edit** prompts (:data:`EDIT_TEMPLATES`: one of the four cells no training image uses, seed ``k``
  asks cell ``k mod 4``): per image whether the object sits in the asked cell (``edit``) and
  whether it does so *and* is the character (``joint_edit``, the protocol's editability: an edit
  that lost the character is not an edit of the character).

Beside the images, the pivot's movement: token L2 and angle from the init word (the training log),
the output-space angle to the init word in the text encoder's output
(:func:`~pti_plugin.metrics.movement.output_space_angles`) and ``lr * steps``.
Each cell is a part (:class:`~.premise.Parts`: ``<out>/parts/<name>.json`` with its per-image lists,
``.npz`` and ``.png`` of its generations), reused when its settings match: the sweep resumes.
The statistics over cells are :mod:`.h1_summary`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..toy_world.detectors import appearance_error, detect, detect_character, has_detail
from ..toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS
from ..toy_world.world import CHARACTER_CELLS, IMAGE_SIZE, bench_data_dir, bench_dataset, parse_caption
from .premise import Parts, check_init_word, model_digest, neutral_prompts, preset_digest, run_preset, sample, train_run

#: Position edits to the cells no training image uses (``{}`` = the pivot): top right, middle left,
#: middle center, bottom right.
EDIT_TEMPLATES = ("a {} at the top right", "a {} at the middle left", "a {} at the middle center",
                  "a {} at the bottom right")
#: Per-image lists a cell records (0/1, or a float for ``appearance_error``; ``in_training_cell`` is
#: None where no object is found).
NEUTRAL_KEYS = ("coarse", "detail", "appearance_error", "has_object", "in_training_cell", "background_edit",
                "joint_background_edit")
EDIT_KEYS = ("edit", "joint_edit")


@dataclass(frozen=True)
class H1Settings:
    """The grid (learning rates x training seeds x vectors) and how each cell samples."""

    init_word: str = "rono"
    # from a pivot that barely moves (3e-6: L2 about 0.03) through the near-step in coarse
    # reconstruction (2e-5..3e-5 on run d) to rates 3000x past it (run d keeps every edit at 1e-2)
    inversion_lrs: tuple[float, ...] = (3e-6, 1e-5, 2e-5, 2.5e-5, 2.75e-5, 3e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    training_seeds: tuple[int, ...] = (42, 1, 2)
    # the textual-inversion paper's check: more vectors trade reconstruction for editability
    vector_counts: tuple[int, ...] = (2, 4)
    vector_lrs: tuple[float, ...] = (3e-5, 1e-4)
    steps: int = 1000
    seeds: int = 64
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE

    @classmethod
    def quick(cls) -> H1Settings:
        """Two rates, two seeds, one vector count, one training step, four samples of one DDIM step (tests; one
        step and one DDIM step keep every table, plot and interval of the quick report)."""
        return cls(inversion_lrs=(1e-4, 1e-2), training_seeds=(42, 1), vector_counts=(2,), vector_lrs=(1e-2,),
                   steps=1, seeds=4, sample_steps=1)

    def sampling(self) -> dict:
        return {"seeds": self.seeds, "sample_steps": self.sample_steps, "guidance": self.guidance}

    def cells(self) -> list[tuple[float, int, int]]:
        """``(lr, training seed, vectors)`` of every cell: the 1-vector grid, then the vector check."""
        one = [(lr, seed, 1) for seed in self.training_seeds for lr in self.inversion_lrs]
        more = [(lr, seed, n) for n in self.vector_counts for seed in self.training_seeds for lr in self.vector_lrs]
        return one + more


def edit_prompts(subject: str, seeds: int) -> list[str]:
    """The edit prompt of each seed ``0..seeds-1`` (template ``k mod 4``) with ``subject`` in place."""
    return [EDIT_TEMPLATES[k % len(EDIT_TEMPLATES)].format(subject) for k in range(seeds)]


def neutral_records(images: np.ndarray, prompts: list[str]) -> dict[str, list]:
    """Per-image ground truth of the neutral generations (uint8 ``[n, 32, 32, 3]``, ``images[k]`` from
    ``prompts[k]``): :data:`NEUTRAL_KEYS`. Three of the four neutral templates ask for a background:
    ``background_edit`` says whether the image has it, ``joint_background_edit`` whether it has it
    *and* shows the character (None for the template that asks none)."""
    out: dict[str, list] = {key: [] for key in NEUTRAL_KEYS}
    for prompt, image in zip(prompts, images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3), strict=True):
        found = detect_character(image)
        asked = parse_caption(prompt)["background"]
        hit = None if asked is None else int(found.object.background == asked)
        out["background_edit"].append(hit)
        out["joint_background_edit"].append(None if hit is None else int(hit and found.is_character))
        cell = (found.object.row, found.object.col)
        out["coarse"].append(int(found.is_character))
        out["detail"].append(int(has_detail(image, found.object)))
        out["appearance_error"].append(float(appearance_error(image, found.object)))
        out["has_object"].append(int(cell[0] is not None))
        out["in_training_cell"].append(None if cell[0] is None else int(cell in CHARACTER_CELLS))
    return out


def edit_records(prompts: list[str], images: np.ndarray) -> dict[str, list]:
    """Per-image edit success of ``images[k]`` generated from ``prompts[k]``: :data:`EDIT_KEYS`."""
    out: dict[str, list] = {key: [] for key in EDIT_KEYS}
    for prompt, image in zip(prompts, images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)):
        asked = parse_caption(prompt)
        found = detect(image)
        hit = (found.row, found.col) == (asked["row"], asked["col"])
        out["edit"].append(int(hit))
        out["joint_edit"].append(int(hit and detect_character(image).is_character))
    return out


def measure_cell(run_dir: Path, settings: H1Settings) -> dict:
    """The inversion run in ``run_dir`` on the neutral and edit prompts, with its pivot's movement."""
    from ..metrics.evaluate import run_movement
    from ..metrics.run_model import load_run

    run = load_run(run_dir, device="cpu", class_word=settings.init_word)
    with run.lora(True):
        uncond = run.encode([""])
        neutral_texts = neutral_prompts(run.pivot_text, settings.seeds)
        neutral = sample(run.pipe, run.encode(neutral_texts), uncond, settings)
        prompts = edit_prompts(run.pivot_text, settings.seeds)
        edits = sample(run.pipe, run.encode(prompts), uncond, settings)
    movement = {key: value for key, value in run_movement(run).items() if key != "lora_delta_norm"}
    return (neutral_records(neutral, neutral_texts) | edit_records(prompts, edits) | {"movement": movement}
            | {"images_generated": np.concatenate([neutral, edits])})


def measure_null(model: Path, settings: H1Settings) -> dict:
    """The base model with the init word on the neutral prompts, twice, with disjoint sampling seeds
    (``0..seeds-1`` as every cell, then ``seeds..2 seeds-1``): lists of set ``a`` and set ``b``."""
    from .premise import encode_text, load_base

    base, pipe = load_base(model)
    texts = neutral_prompts(settings.init_word, settings.seeds)
    cond, uncond = encode_text(base, texts), encode_text(base, [""])
    sets = {name: sample(pipe, cond, uncond, settings, first_seed=first)
            for name, first in (("a", 0), ("b", settings.seeds))}
    return {name: neutral_records(images, texts) for name, images in sets.items()} | {
        "images_generated": np.concatenate(list(sets.values()))}


def cell_preset(base_preset: dict, model: Path, data_dir: Path, settings: H1Settings, lr: float, seed: int,
                vectors: int) -> dict:
    """The trainer preset of one cell: one inversion stage from the init word (``vectors`` vectors)."""
    stage = {"name": "inversion", "kind": "inversion", "steps": settings.steps, "learning_rate": lr}
    preset = run_preset(base_preset, model, data_dir, settings.init_word, stage, None)
    return preset | {"seed": seed, "num_vectors_per_token": vectors}


def cell_name(lr: float, seed: int, vectors: int) -> str:
    return f"inversion-lr{lr:g}-seed{seed}-v{vectors}"


def cell_run_dir(out: Path, preset: dict, digest: str, lr: float, seed: int, vectors: int) -> Path:
    """The training folder of a cell: its name and a digest of its preset and model."""
    return Path(out).resolve() / "runs" / f"{cell_name(lr, seed, vectors)}-{preset_digest(preset | {'model_digest': digest})}"


def pivot_file(model: Path, out: Path, base_preset: dict, settings: H1Settings, lr: float, seed: int) -> Path:
    """The 1-vector pivot an H1 cell trains (or trained) at ``lr`` with training ``seed``."""
    model = Path(model).resolve()
    preset = cell_preset(base_preset, model, bench_data_dir(Path(out).resolve()), settings, lr, seed, 1)
    return cell_run_dir(out, preset, model_digest(model), lr, seed, 1) / "tok1.safetensors"


def run_h1(model: Path, out: Path, base_preset: dict, settings: H1Settings = H1Settings(),
           log: Callable[[str], None] = lambda text: print(text, flush=True), archive: Path | None = None,
           pivot_lr: float | None = None) -> list[dict]:
    """Train and measure every cell (two processes with disjoint ``settings.training_seeds`` share a
    grid), except those the cell archive ``archive`` holds as measured and trained alike
    (:func:`~.cell_archive.left_to_train`) other than the pivots at ``pivot_lr`` (H2 and H3 train from
    their files); returns the records of the cells measured or reused, each with ``lr``, ``seed``,
    ``vectors``, ``steps``."""
    from .cell_archive import h1_cell_id, left_to_train

    model, out = Path(model).resolve(), Path(out).resolve()
    check_init_word(model, settings.init_word)
    data_dir = bench_dataset(out)
    parts = Parts(out, log, "h1")
    digest = model_digest(model)
    planned = []
    for cell in settings.cells():
        preset = cell_preset(base_preset, model, data_dir, settings, *cell)
        planned.append((cell, preset, {"model_digest": digest, "init_word": settings.init_word, "preset": preset}
                        | settings.sampling()))
    planned = left_to_train(planned, archive, h1_cell_id, lambda cell, part: parts.cached(cell_name(*cell), part) is not None,
                            lambda text: log(f"h1: {text}"), keep=lambda cell: cell[0] == pivot_lr and cell[2] == 1)
    if planned:
        parts.get("null", {"model_digest": digest, "init_word": settings.init_word} | settings.sampling(),
                  lambda: measure_null(model, settings))
    cells = []
    for (lr, seed, vectors), preset, part_settings in planned:
        run_dir = cell_run_dir(out, preset, digest, lr, seed, vectors)
        record = parts.get(cell_name(lr, seed, vectors), part_settings,
                           lambda: measure_cell(train_run(preset, run_dir, log, "h1"), settings))
        cells.append(record | {"lr": lr, "seed": seed, "vectors": vectors, "steps": settings.steps})
    return cells


def load_cells(out: Path, settings: H1Settings) -> tuple[dict | None, list[dict]]:
    """The null part and the measured cells of the grid under ``out`` (read only: unmeasured cells are
    left out), each cell with ``lr``, ``seed``, ``vectors``, ``steps``."""
    folder = Path(out) / "parts"

    def read(name: str) -> dict | None:
        path = folder / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    cells = []
    for lr, seed, vectors in settings.cells():
        record = read(cell_name(lr, seed, vectors))
        if record is not None and any(key not in record for key in NEUTRAL_KEYS):  # measured before a key existed
            images = np.load(folder / f"{cell_name(lr, seed, vectors)}.npz")["images"][: settings.seeds]
            record |= neutral_records(images, neutral_prompts("tok1", settings.seeds))
        if record is not None:
            cells.append(record | {"lr": lr, "seed": seed, "vectors": vectors, "steps": settings.steps})
    return read("null"), cells

