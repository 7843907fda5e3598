"""LoRA learning curves on the toy world: ground truth at every saved checkpoint of a run (hypothesis H2).

H2 says the LoRA learns the character's *appearance* before its *position*: the fraction of neutral
generations showing the character rises earlier in training than the fraction of generations placed
in a cell the training images use.

- :func:`checkpoint_files` lists a run's saved LoRAs in step order (the intermediate saves
  ``<output_name>-stepNNNNNNNN.safetensors`` that ``save_every_n_steps`` writes, then the final file);
- :func:`score_checkpoints` generates the neutral prompts :data:`~pti_plugin.toy_world.run_scores.NEUTRAL_PROMPTS` with
  the pivot at every checkpoint of the LoRA stage, and with the pivot alone (LoRA off) as the curve's
  base point, with the same sampling seeds everywhere, and reads each image with the toy world's
  detectors; the result is cached in ``<run_dir>/curve_scores.json``;
- :func:`h2_summary` turns several runs (training seeds of one condition) into the appearance and
  position curves, their half-way times and the ratio of those times with a bootstrap interval.

Steps are the trainer's global steps. The LoRA stage starts after the stages before it (a run from a
shared pivot starts it at 0); the base point stands at that start, and saves made before it (during
an inversion stage, LoRA still zero) are left out of the curve.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write_text
from ..config import Config
from ..outputs import read_training_log
from ..metrics.curves import crossing_time_ratio
from ..metrics.evaluate import json_ready
from ..metrics.replication import Interval, seed_level_interval, two_level_bootstrap
from ..metrics.run_model import find_run_files, read_run_config
from ..settings_cache import read_cache
from ..toy_world.detectors import detect_character, has_detail
from ..toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS
from ..toy_world.run_checks import toy_world_problem
from ..toy_world.run_scores import NEUTRAL_PROMPTS
from ..toy_world.world import CHARACTER_CELLS, IMAGE_SIZE

#: The cache of :func:`score_checkpoints`, in the run's folder.
CACHE_FILE = "curve_scores.json"
#: Bump when the scores change meaning, so that cached scores are recomputed.
SCORES_VERSION = 1
#: Per-image score arrays of a checkpoint (0/1; ``in_training_cell`` is None where no object is found).
IMAGE_SCORES = ("coarse", "detail", "in_training_cell")
_BASE_POINT = "pivot-alone:"  # cache key prefix of the base point (followed by the file whose pivot it uses)


class NoCheckpointsError(ValueError):
    """A run has no intermediate LoRA save inside its LoRA stage: no learning curve can be drawn."""


# ---------------------------------------------------------------------------------------------- files
def _saved_step(path: Path) -> int | None:
    """The global step a LoRA file was saved at, from its ``ss_steps`` metadata (None if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        value = (handle.metadata() or {}).get("ss_steps")
    return int(value) if value is not None and str(value).isdigit() else None


def _last_logged_step(log_path: Path) -> int | None:
    steps = [s for e in read_training_log(log_path) if isinstance(s := e.get("global_step"), int)]
    return max(steps) if steps else None


def checkpoint_files(run_dir: str | Path, output_name: str | None = None) -> list[tuple[int, Path]]:
    """Every saved LoRA of the run in ``run_dir`` as ``(global step, path)``, in step order.

    Intermediate saves ``<output_name>-stepNNNNNNNN.safetensors`` take their step from the name
    (``-interrupted-step`` saves are not listed); the final ``<output_name>.safetensors`` (when the
    run has finished) comes last, at the step in its ``ss_steps`` metadata, else the training log's
    last ``global_step``. Raises FileNotFoundError for a missing folder or a folder without a run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    config_path, final = find_run_files(run_dir, output_name)
    name = final.name[: -len(".safetensors")]
    pattern = re.compile(rf"^{re.escape(name)}-step(\d{{8}})\.safetensors$")
    saves = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := pattern.match(p.name)) and p.is_file())
    if final.is_file():
        step = _saved_step(final)
        step = step if step is not None else _last_logged_step(final.with_name(f"{name}.log.jsonl"))
        if step is None:
            raise ValueError(f"{final}: no ss_steps metadata and no training log to tell its step")
        saves.append((step, final))
    return saves


def lora_stage_start(run_dir: str | Path, output_name: str | None = None, config: Config | None = None) -> int:
    """Global step at which the run's first LoRA stage starts: the steps of the stages before it
    (read from the resolved ``<output_name>.config.toml``, unless ``config``, the run's as
    :func:`~pti_plugin.metrics.run_model.read_run_config` read it, is given). Raises ValueError for a run
    without one."""
    config_path, _ = find_run_files(run_dir, output_name)
    config = read_run_config(config_path) if config is None else config
    start = 0
    for stage in config.stages:
        if stage.kind == "lora":
            return start
        start += int(stage.steps)
    raise ValueError(f"{config_path}: the run has no lora stage, so no LoRA learning curve")


def lora_checkpoints(run_dir: str | Path, output_name: str | None = None
                     ) -> tuple[int, list[tuple[int, Path]], list[tuple[int, Path]]]:
    """``(LoRA stage start, saves inside the LoRA stage, saves before it)`` of a run (saves as
    :func:`checkpoint_files` lists them). Raises :class:`NoCheckpointsError` when fewer than two saves lie
    inside the LoRA stage (the final file alone gives no curve)."""
    return _lora_checkpoints(run_dir, output_name)[1:]


def _lora_checkpoints(run_dir: str | Path, output_name: str | None
                      ) -> tuple[Config, int, list[tuple[int, Path]], list[tuple[int, Path]]]:
    """The run's config (read once), then :func:`lora_checkpoints`' three."""
    files = checkpoint_files(run_dir, output_name)
    config = read_run_config(find_run_files(run_dir, output_name)[0])
    start = lora_stage_start(run_dir, output_name, config)
    in_stage = [(step, path) for step, path in files if step > start]
    if len(in_stage) < 2:
        raise NoCheckpointsError(
            f"{run_dir}: {len(in_stage)} LoRA file(s) saved inside the LoRA stage (steps > {start}); a learning "
            "curve needs intermediate saves: train with save_every_n_steps = N (a few dozen saves per run)")
    return config, start, in_stage, [(step, path) for step, path in files if step <= start]


def check_run(run_dir: str | Path, output_name: str | None = None) -> None:
    """What :func:`score_checkpoints` refuses before it scores, checked without scoring (a command checks each of its
    runs before it scores any): a missing folder or run (FileNotFoundError), too few saves inside the LoRA stage
    (:class:`NoCheckpointsError`), a run that is not a toy-world one (ValueError, :func:`_refuse_unless_toy_world`)."""
    _refuse_unless_toy_world(Path(run_dir), _lora_checkpoints(run_dir, output_name)[0])


def _refuse_unless_toy_world(run_dir: Path, config: Config) -> None:
    """ValueError naming ``run_dir`` when the run of ``config`` is not a toy-world run, whose generations the toy
    world's detectors read (:func:`~pti_plugin.toy_world.run_checks.toy_world_problem`: its model is not a toy-world
    model, e.g. a real SD1.5 trained at 32 px, or it generates at another size). Loads no model."""
    if problem := toy_world_problem(config):
        raise ValueError(f"{run_dir}: {problem}")


# ---------------------------------------------------------------------------------------------- scoring
def image_scores(images: np.ndarray) -> dict[str, list]:
    """Per-image ground truth of uint8 images ``[..., 32, 32, 3]`` (flattened in order): ``coarse``
    (the character's coarse look, 0/1), ``detail`` (its private dot, 0/1) and ``in_training_cell``
    (the object lies in one of :data:`~pti_plugin.toy_world.world.CHARACTER_CELLS`: 0/1; None where no object is
    found)."""
    if images.shape[-3:] != (IMAGE_SIZE, IMAGE_SIZE, 3):  # a reshape would score a larger image's 32 px tiles
        raise ValueError(f"the toy world's detectors read [..., {IMAGE_SIZE}, {IMAGE_SIZE}, 3] images, "
                         f"got {images.shape}")
    out: dict[str, list] = {key: [] for key in IMAGE_SCORES}
    for image in images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3):
        found = detect_character(image)
        cell = (found.object.row, found.object.col)
        out["coarse"].append(int(found.is_character))
        out["detail"].append(int(has_detail(image, found.object)))
        out["in_training_cell"].append(None if cell[0] is None else int(cell in CHARACTER_CELLS))
    return out


def _generate_and_score(run, seeds: list[int], steps: int, guidance: float) -> dict[str, list]:
    """Scores of the neutral prompts' generations, prompt-major: image k is prompt k // len(seeds), seed
    k % len(seeds). The pivot is the subject; the LoRA is on when the run holds one."""
    from ..metrics.localisation import generate_images

    images = [generate_images(run, prompt, True, seeds, steps, guidance) for prompt in NEUTRAL_PROMPTS]
    return image_scores(np.concatenate(images))


def _file_key(path: Path, step: int) -> dict:
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "step": step}


def _score_files(run_dir: Path, output_name: str | None, config: Config, wanted: dict[str, tuple[Path, dict]],
                 settings: dict, device: str | None, log: Callable[[str], None],
                 keep: Callable[[dict[str, dict]], None]) -> None:
    """Score the entries ``wanted`` (cache key -> (LoRA file, file key)) of the run of ``config``, handing each
    file's entries to ``keep`` as soon as they are scored; a base-point key scores that file's pivot with the LoRA
    unloaded, reusing the loaded file when its own entry is wanted too."""
    from ..metrics.movement import lora_delta_norm
    from ..metrics.run_model import load_run

    seeds, steps, guidance = settings["seeds"], settings["steps"], settings["guidance"]
    by_file: dict[Path, list[str]] = {}
    for key, (path, _) in wanted.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        scored = {}
        run = load_run(run_dir, output_name, device=device, lora_file=path, config=config)
        for key in sorted(keys, key=lambda k: k.startswith(_BASE_POINT)):  # the LoRA on first, then unloaded
            log(f"score {run_dir.name} step {wanted[key][1]['step']}: {key}")
            if key.startswith(_BASE_POINT):
                run.pipe.unload_lora_weights()
                if run.has_lora:
                    raise RuntimeError(f"{path}: the LoRA could not be unloaded for the pivot-alone base point")
                norm = 0.0
            else:
                norm = lora_delta_norm(path)["lora_delta_norm"]
            scored[key] = wanted[key][1] | {"lora_delta_norm": norm} | _generate_and_score(run, seeds, steps, guidance)
        keep(scored)


def scored_steps(dense_until: int = 0, every: int = 1, tiers: tuple[tuple[int, int], ...] = ()) -> Callable[[int], bool]:
    """Which saves to score, by LoRA-stage step: every save up to step ``dense_until``, then those at
    multiples of ``every`` (appearance is learned within the first saves, position over hundreds of steps);
    each ``(n, until)`` of ``tiers`` adds the saves at multiples of ``n`` up to step ``until``."""
    return lambda step: (step <= dense_until or step % every == 0
                         or any(step <= until and step % n == 0 for n, until in tiers))


def score_checkpoints(run_dir: str | Path, seeds: list[int], steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
                      device: str | None = None, output_name: str | None = None,
                      log: Callable[[str], None] | None = None, scored: Callable[[int], bool] | None = None) -> dict:
    """Ground truth of the neutral generations at the base point and every checkpoint of the LoRA stage.

    The base point is the pivot alone (LoRA off) at the LoRA stage's start, with the pivot of the
    latest save; each checkpoint is its own saved file (pivot and LoRA on). Every point uses sampling
    ``seeds`` (one CPU generator per seed: the same noise for every checkpoint, and across runs given
    the same seeds), ``steps`` DDIM steps and classifier-free ``guidance``. Returns a JSON-ready dict:
    ``steps`` [points] (global steps, base point first), ``files`` (None for the base point),
    ``lora_delta_norm`` [points] (Frobenius norm of the LoRA's weight change; 0 at the base point),
    and per point the per-image lists of :func:`image_scores` (``coarse``, ``detail``,
    ``in_training_cell``; ``len(NEUTRAL_PROMPTS) * len(seeds)`` images, prompt-major), plus
    ``settings``, ``lora_stage_start`` and ``skipped`` (saves made before the LoRA stage).
    Points are cached in ``<run_dir>/curve_scores.json`` by settings and by each file's name, size and
    mtime, written after every file, so a rerun (or a run after an interruption) scores only new or
    changed files. ``scored`` (e.g. :func:`scored_steps`) picks the
    saves to score by LoRA-stage step; the final save is always scored. Raises :class:`NoCheckpointsError` when no
    save lies inside the LoRA stage before the final one (train with ``save_every_n_steps``), and ValueError, before any
    model loads, when a file is left to score of a run that is not a toy-world one (:func:`check_run`).
    """
    run_dir, log = Path(run_dir), log or (lambda message: None)
    config, start, in_stage, before = _lora_checkpoints(run_dir, output_name)
    if scored is not None:
        in_stage = [(step, path) for step, path in in_stage[:-1] if scored(step - start)] + in_stage[-1:]
    settings = {"version": SCORES_VERSION, "seeds": [int(s) for s in seeds], "steps": int(steps),
                "guidance": float(guidance), "prompts": list(NEUTRAL_PROMPTS)}
    latest = in_stage[-1][1]
    points = {_BASE_POINT + latest.name: (latest, _file_key(latest, start))}
    points |= {path.name: (path, _file_key(path, step)) for step, path in in_stage}
    cache = run_dir / CACHE_FILE
    cached = read_cache(cache, settings, "entries") or {}
    entries = {key: cached[key] for key, (_, file_key) in points.items()
               if key in cached and {k: cached[key].get(k) for k in file_key} == file_key}
    missing = {key: value for key, value in points.items() if key not in entries}

    def keep(scored: dict[str, dict]) -> None:  # after every file: an interrupted scoring keeps what it scored
        entries.update(scored)
        atomic_write_text(cache, json.dumps({"settings": settings, "entries": entries}, indent=1) + "\n")

    if missing:
        _refuse_unless_toy_world(run_dir, config)  # before any model loads
        _score_files(run_dir, output_name, config, missing, settings, device, log, keep)
    ordered = [entries[key] for key in points]
    return {
        "run_dir": str(run_dir), "settings": settings, "lora_stage_start": start,
        "skipped": [{"step": step, "file": path.name} for step, path in before],
        "steps": [e["step"] for e in ordered],
        "files": [None] + [e["file"] for e in ordered[1:]],
        "lora_delta_norm": [e["lora_delta_norm"] for e in ordered],
    } | {key: [e[key] for e in ordered] for key in IMAGE_SCORES}


# ---------------------------------------------------------------------------------------------- H2
def _per_image(run: dict, key: str) -> np.ndarray:
    """``[points, images]`` float array of a run's per-image scores (None -> NaN)."""
    return np.array([[np.nan if v is None else v for v in point] for point in run[key]], dtype=np.float64)


def _fractions(per_image: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a point without any object is NaN
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(per_image, axis=1)


def _mean_curve(per_run_images: list[np.ndarray], draws: int, seed: int) -> list[dict | None]:
    """Per point: mean over runs of the per-run fractions with a two-level bootstrap interval (runs, then
    images); None where no run has a finite value. ``per_run_images``: one ``[points, images]`` per run."""
    width = max(images.shape[1] for images in per_run_images)
    out = []
    for point in range(per_run_images[0].shape[0]):
        values = np.full((len(per_run_images), width), np.nan)  # [runs, images], NaN-padded
        for k, images in enumerate(per_run_images):
            values[k, : images.shape[1]] = images[point]
        try:
            out.append(two_level_bootstrap(values, draws=draws, seed=seed).to_dict())
        except ValueError:  # no finite value at this point
            out.append(None)
    return out


def _ratio_record(first_times: list, second_times: list, ratios: list, interval: Interval | None) -> dict:
    return {"t_app": first_times, "t_pos": second_times, "ratios": ratios,
            "excluded": [k for k, r in enumerate(ratios) if r is None],
            "ratio": None if interval is None else interval.to_dict()}


def _ratio_on_own_axes(x_per_run: list[np.ndarray], appearance: np.ndarray, position: np.ndarray, draws: int,
                       seed: int, plateau_points: int) -> dict:
    """T_pos / T_app with each run on its own x axis (e.g. its LoRA's weight change): per-run times and
    ratios from :func:`crossing_time_ratio` on that run alone, pooled as it pools them (geometric mean,
    bootstrap interval over runs on the log ratios)."""
    single = [crossing_time_ratio(x, appearance[k][None], position[k][None], draws=1, plateau_points=plateau_points)
              for k, x in enumerate(x_per_run)]
    ratios = [r["ratios"][0] for r in single]
    return _ratio_record([r["first_times"][0] for r in single], [r["second_times"][0] for r in single], ratios,
                         _geometric_mean(ratios, draws, seed))


def _geometric_mean(ratios: list[float | None], draws: int, seed: int) -> Interval | None:
    """Runs' ratios pooled as :func:`~pti_plugin.metrics.curves.crossing_time_ratio` pools them: the
    geometric mean, with a bootstrap interval over runs on the log ratios; None without a usable run."""
    logs = np.log([r for r in ratios if r is not None])
    if not logs.size:
        return None
    on_log = seed_level_interval(logs, draws=draws, seed=seed)
    return Interval(math.exp(on_log.estimate), math.exp(on_log.lo), math.exp(on_log.hi))


def _ratio_from_first_save(first_saves: list[float], record: dict, draws: int, seed: int) -> dict:
    """``record``'s T_pos / T_app (a :func:`_ratio_record`) with each run's T_app taken as at least its
    first save (``first_saves``, one per run, on the record's axis): a T_app interpolated between the
    pivot and the first save only says the crossing lies before that save, so the ratio it gives could
    be too high; with T_app raised to the save the ratio is a lower bound for those runs."""
    first = [None if t is None else max(t, save) for t, save in zip(record["t_app"], first_saves)]
    ratios = [None if t1 is None or t2 is None or t2 <= 0 else t2 / t1 for t1, t2 in zip(first, record["t_pos"])]
    return _ratio_record(first, record["t_pos"], ratios, _geometric_mean(ratios, draws, seed)) | {
        "first_saves": list(first_saves),
        "before_first_save": sum(t is not None and t < save for t, save in zip(record["t_app"], first_saves))}


def _mean_time(times: list) -> float:
    finite = [t for t in times if t is not None]
    return float(np.mean(finite)) if finite else float("nan")


def h2_summary(runs: list[dict], draws: int = 2000, seed: int = 0, plateau_points: int = 3) -> dict:
    """H2 on several runs of one condition (training seeds), each a :func:`score_checkpoints` result.

    Per run, the appearance curve is the ``coarse`` fraction per point and the position curve the
    ``in_training_cell`` fraction per point (over the images with an object). All runs need the same
    steps. Times are counted from the base point (x = step - steps[0], i.e. LoRA-stage steps).
    T_app and T_pos are each run's :func:`~pti_plugin.metrics.curves.half_way_step` times (base = the
    base point's value, plateau = mean of the last ``plateau_points``); ``steps_ratio`` is T_pos / T_app
    per run and their geometric mean with a bootstrap interval over runs
    (:func:`~pti_plugin.metrics.curves.crossing_time_ratio`); ``delta_norm_ratio`` is the same with each
    run's ``lora_delta_norm`` as the x axis instead of steps; each ``*_from_first_save`` is its lower
    bound with every T_app at least the first save (:func:`_ratio_from_first_save`). ``appearance`` /
    ``position`` hold the per-run curves ``[runs][points]`` and, per point, the mean over runs with a
    two-level bootstrap interval (runs, then images; None where no run has a value).

    **H2 holds where the ratio's interval excludes 1 from above** (``ratio.lo > 1``: position gets
    half-way later than appearance); ``h2_holds`` says so for the bounded ratio in steps. With 3-5 runs
    the interval is short of its nominal level (see :mod:`pti_plugin.metrics.replication`).
    """
    if not runs:
        raise ValueError("h2_summary needs at least one run")
    steps = np.asarray(runs[0]["steps"], dtype=np.float64)
    for run in runs[1:]:
        if list(run["steps"]) != list(runs[0]["steps"]):
            raise ValueError(f"runs need the same checkpoint steps: {run.get('run_dir', '?')} has {run['steps']}, "
                             f"{runs[0].get('run_dir', '?')} has {runs[0]['steps']}")
    x = steps - steps[0]
    coarse = [_per_image(run, "coarse") for run in runs]
    cells = [_per_image(run, "in_training_cell") for run in runs]
    appearance = np.array([_fractions(c) for c in coarse])  # [runs, points]
    position = np.array([_fractions(c) for c in cells])
    by_steps = crossing_time_ratio(x, appearance, position, draws=draws, seed=seed, plateau_points=plateau_points)
    ratio = by_steps["geometric_mean_ratio"]
    norms = [np.asarray(run["lora_delta_norm"], dtype=np.float64) for run in runs]
    in_steps = _ratio_record(by_steps["first_times"], by_steps["second_times"], by_steps["ratios"], ratio)
    in_norm = _ratio_on_own_axes(norms, appearance, position, draws, seed, plateau_points)
    at_least = _ratio_from_first_save([float(x[1])] * len(runs), in_steps, draws, seed)
    return json_ready({
        "n_runs": len(runs), "steps": x.tolist(), "first_step": float(steps[0]),
        "appearance": {"per_run": appearance.tolist(), "mean": _mean_curve(coarse, draws, seed)},
        "position": {"per_run": position.tolist(), "mean": _mean_curve(cells, draws, seed)},
        "steps_ratio": in_steps,
        "steps_ratio_from_first_save": at_least,
        "delta_norm_ratio": in_norm,
        "delta_norm_ratio_from_first_save": _ratio_from_first_save([float(n[1]) for n in norms], in_norm, draws, seed),
        "t_app_mean": _mean_time(by_steps["first_times"]), "t_pos_mean": _mean_time(by_steps["second_times"]),
        "h2_holds": bool(at_least["ratio"] is not None and at_least["ratio"]["lo"] > 1.0),
    })
