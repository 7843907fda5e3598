"""Position leakage: has fine-tuning taught the model the training images' layouts?

For a set of prompts and fixed seeds, the base model (class word, LoRA off) and the fine-tuned
model (pivot token, LoRA on) each generate one image per (prompt, seed), and the subject is
localised in every image (:mod:`.localisation`); the training images are localised too. With a
distance ``d`` between two layouts:

- **diversity** ``D`` = mean over prompts of the mean pairwise ``d`` between the seeds' layouts
  (how much the layout still varies with the seed);
- **attraction distance** ``A`` = mean over generations of ``d`` to the nearest training layout
  (how far generations stay from the training layouts);
- both relative to the base model: ``r_D = D_tuned / D_base``, ``r_A = A_tuned / A_base``
  (1 = behaves like the base model; below 1 = less varied / closer to the training layouts);
- **leakage score** ``L = 1 - sqrt(r_D * r_A)``: 0 when the fine-tuned model places the subject
  like the base model, 1 when its layouts have collapsed (``r_D = 0``) or sit exactly on the
  training layouts (``r_A = 0``); negative when it is more varied/farther than the base model.
  The geometric mean makes either symptom sufficient, and a ratio change by a factor ``k`` on
  one axis counts as much as ``k`` on the other.

The layout distance ``d`` (family ``heatmap``) is the energy distance between the two layout
distributions on a ``grid x grid`` resampling, halved:
``d(p, q) = pᵀMq - ½ pᵀMp - ½ qᵀMq`` with ``M`` the Euclidean distance between pixel centres in
image fractions. It is 0 only for equal distributions, grows with how far mass must move (unlike
an overlap measure, it does not saturate for disjoint blobs), and equals the distance between
the two points for point masses. Family ``centroid`` uses the Euclidean distance between
centroids; family ``groundtruth`` (toy world only) the distance between detected object centres.
For edit prompts, ``paired_distance`` is the mean ``d`` between the two models' layouts for the
same prompt and seed (does the edit still move the subject as it moves the class word?).

The headline score (:attr:`LeakageMeasurement.score`) is family ``heatmap``, group ``neutral``
(:data:`HEADLINE_GROUP`): the version whose ranking of the toy world's runs was checked against the
ground truth (README, "Model-internal metrics"); the ``all`` group (neutral and edit prompts together)
ranked them less well and is kept as a secondary figure. :meth:`LeakageMeasurement.score_interval`
gives the headline a bootstrap interval over the sampling seeds.

Each model's generations are compared with the training layouts *as that model sees them*: the
training heatmaps are measured once by the base model (class word) and once by the fine-tuned
model (pivot), so that a systematic difference between the two tokens' attention patterns does
not pass for attraction; ``training_observer_distance`` (mean ``d`` between the two
measurements of the same training image) shows how much the two instruments disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .localisation import (centroids, generate_with_heatmaps, heatmap_stats, pixel_centres, resample,
                           training_heatmaps_by_layers)
from .replication import Interval, resampled_interval

MODELS = ("base", "tuned")
GROUPS = ("all", "neutral", "edit")
#: The prompt group of the headline score (family ``heatmap``): the neutral prompts (module docstring).
HEADLINE_GROUP = "neutral"


def layout_distance_matrix(p: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    """Halved energy distances ``[n, m]`` between layout distributions ``p [n, G, G]`` and ``q [m, G, G]``."""
    grid = p.shape[-2:]
    if q.shape[-2:] != grid:
        raise ValueError(f"layouts on different grids: {tuple(grid)} and {tuple(q.shape[-2:])}")
    pos = pixel_centres(*grid)
    metric = torch.cdist(pos, pos)  # [G*G, G*G]
    a, b = p.reshape(len(p), -1).double(), q.reshape(len(q), -1).double()
    cross = a @ metric @ b.T
    self_a = ((a @ metric) * a).sum(1)
    self_b = ((b @ metric) * b).sum(1)
    return (cross - 0.5 * self_a[:, None] - 0.5 * self_b[None, :]).clamp_min(0).numpy()


def point_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[n, m]`` between points ``a [n, 2]`` and ``b [m, 2]``."""
    return np.linalg.norm(np.asarray(a, float)[:, None, :] - np.asarray(b, float)[None, :, :], axis=-1)


def mean_pairwise(distances: np.ndarray) -> float:
    """Mean of the finite entries of the strict upper triangle of a square distance matrix (nan when there are
    none: below 2 items; NaN marks a pair left out, a seed that a resample drew twice)."""
    upper = distances[np.triu_indices(distances.shape[0], k=1)]
    upper = upper[np.isfinite(upper)]
    return float(upper.mean()) if upper.size else float("nan")


def leakage_score(div_tuned: float, div_base: float, attr_tuned: float, attr_base: float) -> dict[str, float]:
    """``diversity_ratio``, ``attraction_ratio`` and ``leakage_score = 1 - sqrt(r_D * r_A)``."""
    r_d = div_tuned / div_base if div_base > 0 else float("nan")
    r_a = attr_tuned / attr_base if attr_base > 0 else float("nan")
    product = r_d * r_a
    score = 1.0 - float(np.sqrt(product)) if np.isfinite(product) and product >= 0 else float("nan")
    return {"diversity_ratio": float(r_d), "attraction_ratio": float(r_a), "leakage_score": score}


def _family_summary(
    within: dict[str, list[np.ndarray]],
    to_train: dict[str, list[np.ndarray]],
    paired: list[np.ndarray],
    groups: list[str],
) -> dict[str, dict[str, float]]:
    """Per group: diversity and attraction of each model, their ratios and the score.

    ``within[model][k]``: the seeds' pairwise distances for prompt k; ``to_train[model][k]``:
    ``[seeds, n_train]`` distances; ``paired[k]``: per-seed tuned-vs-base distances.
    """
    out = {}
    for group in GROUPS:
        ks = [k for k, g in enumerate(groups) if group == "all" or g == group]
        if not ks:
            continue
        entry: dict[str, float] = {}
        for model in MODELS:
            divs = [mean_pairwise(within[model][k]) for k in ks]
            divs = [d for d in divs if np.isfinite(d)]
            nearest = [to_train[model][k].min(axis=1) for k in ks if to_train[model][k].size]
            entry[f"diversity_{model}"] = float(np.mean(divs)) if divs else float("nan")
            entry[f"attraction_{model}"] = float(np.mean(np.concatenate(nearest))) if nearest else float("nan")
        entry |= leakage_score(entry["diversity_tuned"], entry["diversity_base"], entry["attraction_tuned"], entry["attraction_base"])
        pairs = [paired[k] for k in ks if paired[k].size]
        if group != "neutral" and pairs:
            entry["paired_distance"] = float(np.mean(np.concatenate(pairs)))
        out[group] = entry
    return out


@dataclass
class LeakageMeasurement:
    """Everything :func:`measure_position_leakage` measured, for the summary, the CSV and the plots.

    ``images[model]``: uint8 ``[P, S, H, W, 3]``; ``heatmaps[model]``: ``[P, S, h, w]``;
    ``centroids[model]``: ``[P, S, 2]``; ``training_heatmaps[model]`` ``[n, h, w]`` and
    ``training_centroids[model]`` ``[n, 2]``: the training images as each model sees them;
    ``summary[family][group]``: the numbers (see module doc); ``rows``: one dict per generation
    and per (training image, observing model).
    """

    prompts: list[str]
    groups: list[str]
    seeds: list[int]
    images: dict[str, np.ndarray]
    heatmaps: dict[str, torch.Tensor]
    centroids: dict[str, np.ndarray]
    training_images: list[np.ndarray]
    training_heatmaps: dict[str, torch.Tensor]
    training_centroids: dict[str, np.ndarray]
    summary: dict[str, dict[str, dict[str, float]]]
    rows: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    #: ground-truth centres (x, y) or None: ``{"base": [P][S], "tuned": [P][S], "training": [n]}`` (empty without ``locate``)
    groundtruth: dict = field(default_factory=dict)
    #: with ``by_resolution``: the neutral prompts' ``heatmap`` summary from each UNet resolution's cross-attention
    #: layers alone, ``{"16x16": {"leakage_score", "diversity_ratio", "attraction_ratio", ...}}``, finest first
    by_resolution: dict = field(default_factory=dict)
    #: the ``heatmap`` family's distances, per model and prompt: ``within[model][k]`` ``[S, S]`` between the seeds'
    #: layouts, ``to_train[model][k]`` ``[S, n_train]`` to the training layouts (what :meth:`score_interval` resamples)
    heatmap_distances: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The headline leakage score: heatmap layouts, neutral prompts (:data:`HEADLINE_GROUP`); nan without them."""
        return self.summary["heatmap"].get(HEADLINE_GROUP, {}).get("leakage_score", float("nan"))

    @property
    def all_prompts_score(self) -> float:
        """The secondary leakage score: heatmap layouts, neutral and edit prompts together."""
        return self.summary["heatmap"]["all"]["leakage_score"]

    def score_interval(self, draws: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
        """:attr:`score` with a percentile bootstrap interval over the sampling seeds (:func:`seed_interval`)."""
        return seed_interval(self.heatmap_distances, self.groups, HEADLINE_GROUP, draws, level, seed)


def seed_interval(distances: dict, groups: list[str], group: str, draws: int = 2000, level: float = 0.95,
                  seed: int = 0) -> Interval:
    """``group``'s leakage score from ``distances`` (:attr:`LeakageMeasurement.heatmap_distances`) with a ``level``
    percentile interval over ``draws`` resamples of the sampling seeds (the same seeds for every prompt and both
    models, which share them; :func:`~.replication.resampled_interval`). Within a resample, the pairs of a seed
    drawn twice are left out of the diversity (their distance is 0 by construction, not a measured one); a resample
    with a single distinct seed has no diversity and is left out. With 2 seeds every usable resample holds the
    same pair, so the interval is the estimate. All nan without prompts of ``group``."""
    ks = [k for k, g in enumerate(groups) if group == "all" or g == group]
    if not ks or not distances:
        return Interval(float("nan"), float("nan"), float("nan"))
    within, to_train = distances["within"], distances["to_train"]
    sub_groups = [groups[k] for k in ks]

    def statistic(idx: np.ndarray) -> float:
        same = idx[:, None] == idx[None, :]
        w = {m: [np.where(same, np.nan, within[m][k][np.ix_(idx, idx)]) for k in ks] for m in MODELS}
        t = {m: [to_train[m][k][idx] for k in ks] for m in MODELS}
        return _family_summary(w, t, [np.zeros(0)] * len(ks), sub_groups)[group]["leakage_score"]

    return resampled_interval(len(within["tuned"][ks[0]]), statistic, draws, level, seed)


def _layout_summaries(heat: dict[str, torch.Tensor], cents: dict[str, np.ndarray], train_maps: dict[str, torch.Tensor],
                      train_cents: dict[str, np.ndarray], groups: list[str], grid: int) -> tuple[dict, dict]:
    """The ``heatmap`` and ``centroid`` families' summaries (diversity, attraction, score per group) from the
    generations' heatmaps ``heat[model] [P, S, h, w]`` and centroids ``cents[model] [P, S, 2]`` against the
    training images' maps and centroids; also the ``heatmap`` family's distances
    (:attr:`LeakageMeasurement.heatmap_distances`)."""
    train_grid = {m: resample(train_maps[m], grid) for m in MODELS}
    prompt_count = len(groups)
    within: dict[str, dict[str, list[np.ndarray]]] = {f: {m: [] for m in MODELS} for f in ("heatmap", "centroid")}
    to_train: dict[str, dict[str, list[np.ndarray]]] = {f: {m: [] for m in MODELS} for f in ("heatmap", "centroid")}
    paired: dict[str, list[np.ndarray]] = {"heatmap": [], "centroid": []}
    grids = {m: [resample(heat[m][k], grid) for k in range(prompt_count)] for m in MODELS}
    for k in range(prompt_count):
        for m in MODELS:
            within["heatmap"][m].append(layout_distance_matrix(grids[m][k], grids[m][k]))
            to_train["heatmap"][m].append(layout_distance_matrix(grids[m][k], train_grid[m]))
            within["centroid"][m].append(point_distance_matrix(cents[m][k], cents[m][k]))
            to_train["centroid"][m].append(point_distance_matrix(cents[m][k], train_cents[m]))
        paired["heatmap"].append(np.diag(layout_distance_matrix(grids["tuned"][k], grids["base"][k])))
        paired["centroid"].append(np.linalg.norm(cents["tuned"][k] - cents["base"][k], axis=-1))
    summary = {f: _family_summary(within[f], to_train[f], paired[f], groups) for f in ("heatmap", "centroid")}
    summary["heatmap"]["all"]["training_observer_distance"] = float(
        np.diag(layout_distance_matrix(train_grid["tuned"], train_grid["base"])).mean())
    summary["centroid"]["all"]["training_observer_distance"] = float(
        np.linalg.norm(train_cents["tuned"] - train_cents["base"], axis=-1).mean())
    return summary, {"within": within["heatmap"], "to_train": to_train["heatmap"]}


def layout_scores(heat: dict[str, torch.Tensor], train_maps: dict[str, torch.Tensor], groups: list[str],
                  grid: int = 16) -> dict:
    """The ``heatmap`` and ``centroid`` families' summaries (as in :attr:`LeakageMeasurement.summary`) of given
    heatmaps: ``heat[model]`` ``[P, S, h, w]`` of the generations (``groups[k]``: prompt k's group),
    ``train_maps[model]`` ``[n, h, w]`` of the training images, for each model of :data:`MODELS`."""
    return scored_heatmaps(heat, train_maps, groups, grid).summary


def scored_heatmaps(heat: dict[str, torch.Tensor], train_maps: dict[str, torch.Tensor], groups: list[str],
                    grid: int = 16) -> LeakageMeasurement:
    """A :class:`LeakageMeasurement` of given heatmaps alone (as :func:`layout_scores`; no images, no rows, the
    prompts named by their group and the seeds numbered from 0): its :attr:`~LeakageMeasurement.score`,
    summary and :meth:`~LeakageMeasurement.score_interval` re-score saved heatmaps."""
    cents = {m: centroids(heat[m].reshape(-1, *heat[m].shape[-2:])).reshape(*heat[m].shape[:2], 2) for m in MODELS}
    train_cents = {m: centroids(train_maps[m]) for m in MODELS}
    summary, distances = _layout_summaries(heat, cents, train_maps, train_cents, groups, grid)
    return LeakageMeasurement(
        prompts=list(groups), groups=list(groups), seeds=list(range(heat["tuned"].shape[1])), images={}, heatmaps=heat,
        centroids=cents, training_images=[], training_heatmaps=train_maps, training_centroids=train_cents,
        summary=summary, heatmap_distances=distances)


def leakage_by_resolution(run, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.5,
                          grid: int = 16, training_timestep: int = 500, all_layers: bool = False) -> dict[str, dict]:
    """The ``heatmap`` leakage of ``prompts`` (one group, neutral) from the cross-attention layers of one UNet
    resolution at a time (:attr:`LeakageMeasurement.by_resolution`), all from one sampling per prompt and model;
    ``all_layers`` adds, last, as ``"all"``, the score of every layer's maps together from the same sampling
    (what :func:`measure_position_leakage` scores)."""
    m = measure_position_leakage(run, prompts, [], seeds, steps, guidance, grid, training_timestep=training_timestep,
                                 by_resolution=True)
    return m.by_resolution | ({"all": m.summary["heatmap"]["neutral"]} if all_layers else {})


def _sample_prompts(run, prompts: list[str], groups: list[str], seeds: list[int], steps: int, guidance: float,
                    size: tuple[int, int] | None, capture_timesteps: tuple[int, int] | None, by_resolution: bool,
                    log: Callable[[str], None] | None) -> tuple[dict, dict, dict]:
    """Each prompt sampled once per model: ``images[model][k]`` uint8 ``[S, H, W, 3]``, ``maps[model][k]``
    ``[S, h, w]`` from every cross-attention layer, and with ``by_resolution`` ``per_level[model][pixels][j]``
    ``[S, h, w]``: the j-th neutral prompt's maps from the layers with ``pixels`` query positions alone."""
    from .localisation import generate_with_resolution_heatmaps

    images: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    maps: dict[str, list[torch.Tensor]] = {m: [] for m in MODELS}
    per_level: dict[str, dict[int, list[torch.Tensor]]] = {m: {} for m in MODELS}
    for k, prompt in enumerate(prompts):
        for model in MODELS:
            if log:
                log(f"[{k + 1}/{len(prompts)}] {model}: {run.prompt(prompt, model == 'tuned')!r} x {len(seeds)} seeds")
            if by_resolution and groups[k] == "neutral":
                imgs, levels = generate_with_resolution_heatmaps(run, prompt, model == "tuned", seeds, steps, guidance, size,
                                                                 all_layers=True, capture_timesteps=capture_timesteps)
                hms = levels.pop(None)
                for pixels, level_maps in levels.items():
                    per_level[model].setdefault(pixels, []).append(level_maps)
            else:
                imgs, hms = generate_with_heatmaps(run, prompt, model == "tuned", seeds, steps, guidance, size,
                                                   capture_timesteps=capture_timesteps)
            images[model].append(imgs)
            maps[model].append(hms)
    return images, maps, per_level


def _scores_by_level(per_level: dict, train_by_layers: dict, grid: int) -> dict[str, dict]:
    """The neutral prompts' ``heatmap`` summary from each resolution's maps alone (see :func:`_sample_prompts`),
    against the training images' maps of the same layers (``train_by_layers[model][pixels]``), finest first,
    keyed by the layers' latent grid (``"16x16"``)."""
    from .attention_capture import layer_grid

    out = {}
    for pixels in per_level["tuned"]:
        heat = {m: torch.stack(per_level[m][pixels]) for m in MODELS}  # [P_neutral, S, H, W]
        train = {m: train_by_layers[m][pixels] for m in MODELS}
        name = "x".join(map(str, layer_grid(pixels, *heat["tuned"].shape[-2:])))
        out[name] = layout_scores(heat, train, ["neutral"] * len(heat["tuned"]), grid)["heatmap"]["neutral"]
    return out


def measure_position_leakage(
    run,
    neutral_prompts: list[str],
    edit_prompts: list[str],
    seeds: list[int],
    steps: int = 25,
    guidance: float = 7.5,
    grid: int = 16,
    size: tuple[int, int] | None = None,
    training_timestep: int = 500,
    locate: Callable[[np.ndarray], tuple[float, float] | None] | None = None,
    log: Callable[[str], None] | None = None,
    capture_timesteps: tuple[int, int] | None = None,
    by_resolution: bool = False,
) -> LeakageMeasurement:
    """Generate, localise and score (see the module docstring) for a loaded run.

    ``capture_timesteps``: the generations' heatmaps from the sampler steps in that timestep range
    only (the training heatmaps stay at ``training_timestep``).

    ``locate`` (optional): a ground-truth locator ``uint8 image -> (x, y) in image fractions or
    None``, e.g. the toy world's detectors; it adds the ``groundtruth`` family.

    ``by_resolution``: also the neutral prompts' ``heatmap`` leakage from the cross-attention layers of
    each UNet resolution alone (:attr:`LeakageMeasurement.by_resolution`), from the same sampling.
    """
    prompts = list(neutral_prompts) + list(edit_prompts)
    groups = ["neutral"] * len(neutral_prompts) + ["edit"] * len(edit_prompts)
    if not prompts:
        raise ValueError("no prompts to measure")
    if len(seeds) < 2:
        raise ValueError("layout diversity needs at least 2 seeds")
    images, maps, per_level = _sample_prompts(run, prompts, groups, seeds, steps, guidance, size, capture_timesteps,
                                              by_resolution, log)
    layers = [None, *per_level["tuned"]]  # every layer, then each resolution the neutral prompts were read at
    train_by_layers = {m: training_heatmaps_by_layers(run, layers, tuned=m == "tuned", timestep=training_timestep)
                       for m in MODELS}  # one UNet pass per training image for all of them
    train_maps = {m: train_by_layers[m][None] for m in MODELS}
    train_images = run.training_images_uint8()

    heat = {m: torch.stack(maps[m]) for m in MODELS}  # [P, S, h, w]
    cents = {m: centroids(heat[m].reshape(-1, *heat[m].shape[-2:])).reshape(len(prompts), len(seeds), 2) for m in MODELS}
    train_cents = {m: centroids(train_maps[m]) for m in MODELS}
    summary, distances = _layout_summaries(heat, cents, train_maps, train_cents, groups, grid)

    gt: dict[str, list[list]] = {}
    train_gt: list = []
    if locate is not None:
        gt = {m: [[locate(img) for img in images[m][k]] for k in range(len(prompts))] for m in MODELS}
        train_gt = [locate(img) for img in train_images]
        summary["groundtruth"] = _groundtruth_summary(gt, train_gt, groups)

    rows = _generation_rows(run, prompts, groups, seeds, heat, distances["to_train"], gt if locate is not None else None)
    rows += _training_rows(run, train_maps, train_gt if locate is not None else None)

    return LeakageMeasurement(
        prompts=[run.prompt(p, True) for p in prompts], groups=groups, seeds=list(seeds),
        images={m: np.stack(images[m]) for m in MODELS}, heatmaps=heat, centroids=cents,
        training_images=train_images, training_heatmaps=train_maps, training_centroids=train_cents,
        summary=summary, rows=rows, groundtruth=(gt | {"training": train_gt}) if locate is not None else {},
        by_resolution=_scores_by_level(per_level, train_by_layers, grid), heatmap_distances=distances,
        settings={"steps": steps, "guidance": guidance, "grid": grid, "training_timestep": training_timestep,
                  "capture_timesteps": capture_timesteps,
                  "class_word": run.class_word, "token": run.token},
    )


def _groundtruth_summary(gt: dict[str, list[list]], train_gt: list, groups: list[str]) -> dict:
    """The ``groundtruth`` family: :func:`_family_summary` of the located points (images where the
    locator finds nothing are left out), plus the fraction of generations it found."""
    located = np.array([c for c in train_gt if c is not None], float).reshape(-1, 2)
    within: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    to_train: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    paired: list[np.ndarray] = []
    for k in range(len(groups)):
        for m in MODELS:
            pts = np.array([c for c in gt[m][k] if c is not None], float).reshape(-1, 2)
            within[m].append(point_distance_matrix(pts, pts))
            to_train[m].append(point_distance_matrix(pts, located) if len(located) else np.zeros((0, 0)))
        both = [(a, b) for a, b in zip(gt["tuned"][k], gt["base"][k]) if a is not None and b is not None]
        paired.append(np.array([np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in both], float))
    summary = _family_summary(within, to_train, paired, groups)
    found = [c is not None for m in MODELS for k in range(len(groups)) for c in gt[m][k]]
    summary["all"]["detected_fraction"] = float(np.mean(found))
    return summary


def _groundtruth_columns(point: tuple[float, float] | None) -> dict[str, float | None]:
    return {"groundtruth_x": point[0] if point else None, "groundtruth_y": point[1] if point else None}


def _generation_rows(run, prompts: list[str], groups: list[str], seeds: list[int], heat: dict[str, torch.Tensor],
                     to_train: dict[str, list[np.ndarray]], gt: dict[str, list[list]] | None) -> list[dict]:
    """One CSV row per generated image (``gt``: the located points, None without a locator)."""
    rows = []
    for k, prompt in enumerate(prompts):
        for m in MODELS:
            nearest = to_train[m][k].min(axis=1)
            for s, seed in enumerate(seeds):
                stats = heatmap_stats(heat[m][k, s])
                row = {
                    "kind": "generation", "model": m, "group": groups[k], "prompt": run.prompt(prompt, m == "tuned"),
                    "seed": seed, "centroid_x": stats.x, "centroid_y": stats.y, "spread": stats.spread,
                    "nearest_training_distance": float(nearest[s]),
                }
                if gt is not None:
                    row |= _groundtruth_columns(gt[m][k][s])
                rows.append(row)
    return rows


def _training_rows(run, train_maps: dict[str, torch.Tensor], train_gt: list | None) -> list[dict]:
    """One CSV row per training image and model (``train_gt``: the located points, None without a locator)."""
    rows = []
    for m in MODELS:
        for i, item in enumerate(run.items):
            stats = heatmap_stats(train_maps[m][i])
            row = {
                "kind": "training", "model": m, "group": "training", "prompt": run.prompt(item.caption, m == "tuned"),
                "seed": None, "centroid_x": stats.x, "centroid_y": stats.y, "spread": stats.spread,
                "nearest_training_distance": 0.0, "image": str(item.path),
            }
            if train_gt is not None:
                row |= _groundtruth_columns(train_gt[i])
            rows.append(row)
    return rows
