"""Do the model-internal metrics rank the toy world's runs as its ground truth does?

A real-model run has no detector: the project reads position leakage from cross-attention heatmaps
of ``tok1`` (``attention_leakage``), reconstruction from the denoising proxy and editability from
the edit-direction proxy. On the toy world every finished LoRA run is scored both ways by
:func:`~pti_plugin.toy_world.run_scores.score_run` (the research bench's scorer and cache, ``<run>/bench_scores.json``:
ground truth and internal metrics from the same generations), and each pair of :func:`pairs` gets
Spearman's rho over runs with a 95% percentile bootstrap interval over *training seeds*
(:func:`~pti_plugin.metrics.correlation.correlation_interval` with ``clusters``): the runs of one
training seed share its pivot (at lr 1e-5 they are that pivot plus noise), so they are resampled
together, the seed being the unit of replication. Runs that are not H3 cells count as their own unit.

Every version of the leakage metric the scorer computes is reported (:data:`LEAKAGE_VERSIONS`), not
only the best, against the target rho :data:`TARGET`. One more version is measured here
(:func:`band_scores`, cached in ``<run>/attention_band.json``): the same neutral generations (same
prompts and seeds, so the same images and ground truth) with the heatmaps taken only from the sampler
steps in the band where the toy world decides positions (``h3_variants.POSITION_BAND``), and the
training images' heatmaps at the band's middle timestep.

**How far any metric could go.** The scorer's ground truth comes from 32 images a run; for runs of the
research protocol's H3 the training-cell fraction was also measured independently (64 other sampling
seeds, four other neutral templates: :data:`INDEPENDENT`, from ``h3/parts``). The rho between the two
ground truths is the ceiling a model-internal metric could reach against either, and every leakage
version is also correlated with the independent one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write_text
from ..metrics.attention_capture import cross_attention_sides
from ..metrics.correlation import correlation_interval, within_group_spearman
from ..outputs import run_dir_finished
from ..settings_cache import read_cache
from ..toy_world import WEIGHTS_DIR
from ..toy_world.run_scores import CORRELATIONS, scores_of

#: Spearman's rho the attention leakage should reach against the ground truth (0.68 on toy world v1).
TARGET = 0.8
#: The leakage scores of :func:`~pti_plugin.metrics.measure_position_leakage` (family ``heatmap``: where
#: ``tok1``'s cross-attention mass lies; ``centroid``: its centre of mass), per prompt group.
LEAKAGE_VERSIONS = {
    "attention_leakage": "heatmaps, neutral prompts (what the real-model path reports)",
    "heatmap_all_leakage_score": "heatmaps, neutral and position-edit prompts",
    "heatmap_edit_leakage_score": "heatmaps, position-edit prompts",
    "centroid_neutral_leakage_score": "attention centroids, neutral prompts",
    "centroid_all_leakage_score": "attention centroids, neutral and position-edit prompts",
    "attention_leakage_band": "heatmaps, neutral prompts, sampler steps in the position band only",
    "centroid_neutral_leakage_score_band": "attention centroids, neutral prompts, sampler steps in the position band only",
}
#: Each half of a neutral-prompt leakage score on its own (the score is ``1 - sqrt(r_D * r_A)``, see
#: ``metrics/leakage.py``): ``1 - r_A``, how much nearer the training images' maps (or centroids) the
#: generations sit than the base model's; ``1 - r_D``, how much less they vary. Computed from the cached
#: ratios: version -> (ratio it reads, description).
COMPONENT_VERSIONS = {
    f"{family}_neutral_{part}_only": (f"{family}_neutral_{part}_ratio", f"{label}, neutral prompts, {what} only")
    for family, label in (("heatmap", "heatmaps"), ("centroid", "attention centroids"))
    for part, what in (("attraction", "attraction to the training images (1 - r_A)"),
                       ("diversity", "lost layout diversity (1 - r_D)"))
}
LEAKAGE_VERSIONS |= {version: description for version, (_, description) in COMPONENT_VERSIONS.items()}
BAND_FILE = "attention_band.json"
#: The shipped toy UNet's cross-attention resolutions (latent sides, finest first, from its config), each a
#: version of the neutral-prompt heatmap leakage from those layers alone (:func:`layer_scores`).
LAYER_SIDES = cross_attention_sides(json.loads((WEIGHTS_DIR / "unet" / "config.json").read_text()))
LAYER_VERSIONS = {f"attention_leakage_{side}x{side}": f"heatmaps, neutral prompts, cross-attention layers at {side}x{side} only"
                  for side in LAYER_SIDES}
LEAKAGE_VERSIONS |= LAYER_VERSIONS
LAYERS_FILE = "attention_layers.json"
#: In a run's layer scores: the all-layer score from the same sampling, the scorer's ``attention_leakage``
#: again (older caches lack it); :func:`layer_rows` reads it instead of running the scorer.
ALL_LAYERS = "attention_leakage_all"
#: The training-cell fraction of the run's H3 cell (64 sampling seeds, the protocol's neutral prompts).
INDEPENDENT = "h3_training_cell_fraction"
LEAKAGE_TRUTHS = ("gt_leakage", "gt_training_cell_fraction", INDEPENDENT)
RELIABILITY = "the scorer's ground truth against the independent one (the ceiling)"


def pairs() -> list[tuple[str, str, int]]:
    """``(internal metric, ground truth, expected sign)``: every leakage version against each leakage truth,
    then the research bench's LoRA-run proxies (:data:`~pti_plugin.toy_world.run_scores.CORRELATIONS`)."""
    reliability = [(truth, INDEPENDENT, +1) for truth in LEAKAGE_TRUTHS[:2]]
    leakage = reliability + [(version, truth, +1) for version in LEAKAGE_VERSIONS for truth in LEAKAGE_TRUTHS]
    proxies = [(internal, truth, sign) for internal, truth, sign, over in CORRELATIONS
               if over == "lora" and internal not in LEAKAGE_VERSIONS]
    return leakage + proxies


def find_runs(folders: list[Path], output_name: str) -> list[Path]:
    """The finished runs (:func:`~pti_plugin.outputs.run_dir_finished`: the LoRA and the embedding) directly
    under ``folders``, sorted."""
    return sorted(d for folder in folders for d in Path(folder).iterdir() if d.is_dir() and run_dir_finished(d, output_name))


def output_names(folders: list[Path]) -> list[str]:
    """The output names of the finished runs directly under ``folders`` (from their ``<name>.config.toml``), for
    the refusal of an ``--output_name`` no run has."""
    names = set()
    for run in (d for folder in folders for d in Path(folder).iterdir() if d.is_dir()):
        names |= {name for name in (c.name[: -len(".config.toml")] for c in run.glob("*.config.toml"))
                  if run_dir_finished(run, name)}
    return sorted(names)


def scorer_sampler(scheduler_config: Path):
    """The scorer's sampler: diffusers' DDIM scheduler from the model's ``scheduler_config.json``, as
    :func:`~pti_plugin.metrics.run_model.open_model` builds it from the model's scheduler. Reads that file; loads no
    model."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(DDIMScheduler.load_config(str(Path(scheduler_config).parent)))


def sampler_timesteps(sampler, steps: int) -> list[int]:
    """The training-scale timesteps of ``sampler`` (:func:`scorer_sampler`) at ``steps`` steps, descending.
    ValueError where DDIM cannot take ``steps``."""
    sampler.set_timesteps(steps)
    return [int(t) for t in sampler.timesteps]


def band_steps_problem(scheduler_config: Path, steps: int, band: tuple[int, int], default_band: bool = False
                       ) -> str | None:
    """Why the band versions cannot be measured at ``steps`` sampler steps, else None: their heatmaps come from the
    steps whose timestep lies in ``band`` (:func:`band_scores`), and no step of :func:`sampler_timesteps` does (with
    2 or 4 steps none falls in the toy world's band 780-930), so no cross-attention call would be recorded after
    the run's standard scoring. Names ``--sample_steps``, ``--band`` and the fewest steps above ``steps`` that reach
    the band (``default_band``: ``--band`` was not given)."""
    low, high = band
    sampler = scorer_sampler(scheduler_config)  # read once; the search below only sets its steps
    try:
        timesteps = sampler_timesteps(sampler, steps)
    except ValueError as exc:
        return f"--sample_steps {steps}: {exc}"
    if any(low <= t <= high for t in timesteps):
        return None
    more = next((n for n in range(steps + 1, sampler.config.num_train_timesteps + 1)
                 if any(low <= t <= high for t in sampler_timesteps(sampler, n))), None)
    given = f"--band {low},{high}" + (" (the default: the toy world's position band)" if default_band else "")
    fix = (f"use --sample_steps {more} (the fewest steps above {steps} with one in the band) or --no_band"
           if more is not None else "use --no_band or a wider --band")
    return (f"--sample_steps {steps} with {given}: none of the DDIM sampler's timesteps "
            f"({', '.join(map(str, timesteps))}; scheduler {scheduler_config}) lies in the band, so the band versions "
            f"would record no cross-attention call: {fix}")


def runs_problem(runs: list[Path], output_name: str, steps: int, band: tuple[int, int] | None,
                 default_band: bool = False) -> str | None:
    """Why ``runs`` cannot be scored, found before any model loads, else None: a run that is not a toy-world run
    (:func:`~pti_plugin.toy_world.run_checks.toy_world_problem`: another model, or generations of another size, which
    the toy world's detectors cannot read), or with ``band`` a band no sampler step reaches (:func:`band_steps_problem`,
    from the scheduler config of each run's model). A run whose config cannot be read is left to the scorer (its
    scores may be cached; loading it names what is wrong)."""
    from ..config import ConfigError
    from ..input_checks import _component_config
    from ..metrics.run_model import find_run_files, read_run_config
    from ..toy_world.run_checks import toy_world_problem

    checked: dict[Path, str | None] = {}
    for run in runs:
        try:
            config = read_run_config(find_run_files(run, output_name)[0])
        except (OSError, ValueError, ConfigError):
            continue
        if problem := toy_world_problem(config):
            return f"{run}: {problem}"
        scheduler = _component_config(config, "scheduler", "scheduler_config.json") if band is not None else None
        if scheduler is not None and scheduler not in checked:
            checked[scheduler] = band_steps_problem(scheduler, steps, band, default_band)
        if scheduler is not None and checked[scheduler]:
            return checked[scheduler]
    return None


def band_scores(run: Path, scoring: argparse.Namespace, band: tuple[int, int], cached_only: bool = False) -> dict | None:
    """The band versions of the neutral-prompt leakage (heatmaps and centroids) of ``run``, from its cache
    when the settings match (None with ``cached_only`` and no such cache)."""
    settings = {"band": list(band), "seeds": scoring.seeds, "steps": scoring.sample_steps, "guidance": scoring.guidance}
    cache = run / BAND_FILE
    cached = None if scoring.rescore else read_cache(cache, settings, "scores")
    if cached is not None:
        return cached
    if cached_only:
        return None
    from ..metrics.leakage import measure_position_leakage
    from ..metrics.run_model import load_run
    from ..toy_world.run_scores import NEUTRAL_PROMPTS

    loaded = load_run(run, device=scoring.device)
    measured = measure_position_leakage(loaded, list(NEUTRAL_PROMPTS), [], list(range(scoring.seeds)),
                                        scoring.sample_steps, scoring.guidance, training_timestep=sum(band) // 2,
                                        capture_timesteps=band)
    scores = {"attention_leakage_band": measured.summary["heatmap"]["neutral"]["leakage_score"],
              "centroid_neutral_leakage_score_band": measured.summary["centroid"]["neutral"]["leakage_score"]}
    atomic_write_text(cache, json.dumps({"settings": settings, "scores": scores}, indent=1) + "\n")
    return scores


def layer_scores(run: Path, scoring: argparse.Namespace, cached_only: bool = False,
                 need_all: bool = False) -> dict | None:
    """The :data:`LAYER_VERSIONS` of ``run`` (the neutral prompts' heatmap leakage from the cross-attention
    layers of one resolution at a time, one sampling for all) and :data:`ALL_LAYERS`, from its cache when
    the settings match (None with ``cached_only`` and no such cache; ``need_all``: a cache written before
    :data:`ALL_LAYERS` was kept counts as none). The same prompts, seeds and training-image timestep as the
    scorer's ``attention_leakage``, which these maps average to."""
    settings = {"seeds": scoring.seeds, "steps": scoring.sample_steps, "guidance": scoring.guidance}
    cache = run / LAYERS_FILE
    cached = None if scoring.rescore else read_cache(cache, settings, "scores")
    if cached is not None and need_all and ALL_LAYERS not in cached:
        cached = None
    if cached is not None or cached_only:
        return cached
    from ..metrics.leakage import leakage_by_resolution
    from ..metrics.run_model import load_run
    from ..toy_world.run_scores import NEUTRAL_PROMPTS

    by_resolution = leakage_by_resolution(load_run(run, device=scoring.device), list(NEUTRAL_PROMPTS),
                                          list(range(scoring.seeds)), scoring.sample_steps, scoring.guidance,
                                          all_layers=True)
    scores = {f"attention_leakage_{grid}": summary["leakage_score"] for grid, summary in by_resolution.items()}
    atomic_write_text(cache, json.dumps({"settings": settings, "scores": scores}, indent=1) + "\n")
    return scores


def layer_rows(runs: list[Path], scoring: argparse.Namespace, shard: tuple[int, int] = (0, 1),
               log: Callable[[str], None] = print, cached_only: bool = False) -> list[dict]:
    """Rows of the runs of ``shard`` (every n-th from the k-th) with only their :func:`layer_scores`, the
    all-layer one (:data:`ALL_LAYERS`, from the same sampling) as ``attention_leakage``: what the layer
    comparison reads, without the scorer's detector truth and proxies (about a fifth of its cost).
    ``cached_only``: the runs whose layer scores are cached, nothing computed."""
    k, n = shard
    rows = []
    for i, run in enumerate(runs):
        if i % n != k:
            continue
        log(f"[{i + 1}/{len(runs)}] {run.name}")
        by_layer = layer_scores(run, scoring, cached_only, need_all=True)
        if by_layer is not None:
            rows.append({"run": run.name, "attention_leakage": by_layer[ALL_LAYERS]}
                        | {key: value for key, value in by_layer.items() if key != ALL_LAYERS})
    return rows


def score_runs(runs: list[Path], output_name: str, scoring: argparse.Namespace, shard: tuple[int, int] = (0, 1),
               log: Callable[[str], None] = print, cached_only: bool = False,
               band: tuple[int, int] | None = None, layers: bool = False) -> list[dict]:
    """Scores of the runs of ``shard`` ``(k, n)`` (every n-th run from the k-th), each cached beside its run
    (:func:`~pti_plugin.toy_world.run_scores.scores_of`; ``scoring``: its seeds, sample_steps, guidance, max_images,
    device, rescore). ``cached_only``: the runs already scored with these settings, nothing computed.
    ``band``: :func:`band_scores` too, for runs whose standard scores are there; ``layers``: :func:`layer_scores` too."""
    k, n = shard
    rows = []
    for i, run in enumerate(runs):
        if i % n == k:
            log(f"[{i + 1}/{len(runs)}] {run.name}")
            scores = scores_of(run, output_name, scoring, cached_only)
            if scores is None:
                continue
            banded = None if band is None else band_scores(run, scoring, band, cached_only)
            by_layer = layer_scores(run, scoring, cached_only) if layers else None
            rows.append({"run": run.name} | scores | component_scores(scores) | (banded or {}) | (by_layer or {}))
    return rows


def component_scores(scores: dict) -> dict[str, float]:
    """The :data:`COMPONENT_VERSIONS` of one run's cached scores (those whose ratio is there)."""
    return {version: 1.0 - scores[ratio] for version, (ratio, _) in COMPONENT_VERSIONS.items()
            if isinstance(scores.get(ratio), (int, float))}


def _run_cell(name: str) -> str:
    """The H3 cell name of a run folder named ``<cell name>-<digest>``."""
    return name.rsplit("-", 1)[0]


def _run_key(name: str) -> tuple[str, float | None, float, int] | None:
    """``(variant, weight, lr, seed)`` of an H3 run named ``<cell name>-<digest>``, else None."""
    from .h3_variants import cell_key

    return cell_key(_run_cell(name))


def run_learning_rate(name: str) -> float | None:
    """The LoRA learning rate of an H3 run (named ``<cell name>-<digest>``), else None."""
    key = _run_key(name)
    return None if key is None else key[2]


def run_training_seed(name: str) -> int | None:
    """The training seed of an H3 run (its unit of replication), else None."""
    key = _run_key(name)
    return None if key is None else key[3]


#: The pairs :func:`per_rate` breaks down by learning rate: the metric the real-model path reports, and the ceiling.
PER_RATE_PAIRS = (("attention_leakage", INDEPENDENT), ("gt_leakage", INDEPENDENT))


def per_rate(rows: list[dict], rates: list[float | None], draws: int = 2000) -> list[dict]:
    """For each learning rate (``rates[k]``: row k's, from :func:`run_learning_rate`) and each of
    :data:`PER_RATE_PAIRS`: Spearman over that rate's runs with its interval over their training seeds, and the spread (standard
    deviation) of the truth there, which says whether the runs of that rate differ enough to be ranked."""
    out = []
    for rate in sorted({r for r in rates if r is not None}):
        members = [row for row, r in zip(rows, rates) if r == rate]
        seeds = [run_training_seed(row["run"]) for row in members]
        for internal, truth in PER_RATE_PAIRS:
            values = [row[truth] for row in members if isinstance(row.get(truth), (int, float))]
            c = correlation_interval([row.get(internal) for row in members], [row.get(truth) for row in members], draws,
                                     clusters=seeds)
            out.append({"lr": rate, "internal": internal, "ground_truth": truth, "truth_sd": float(np.std(values))
                        if values else float("nan"), "training_seeds": len(set(seeds))} | c)
    return out


def summarise(rows: list[dict], draws: int = 2000) -> dict:
    """Each pair's Pearson, Spearman (interval over training seeds) and n, and ``within_lr``: Spearman inside each
    learning rate, averaged (:func:`~pti_plugin.metrics.correlation.within_group_spearman`; does the metric
    rank runs trained at the same rate?); for the leakage versions, whether the pooled interval lies at or
    above :data:`TARGET` (the reading :func:`verdict` calls "meets")."""
    out = []
    rates = [run_learning_rate(r["run"]) for r in rows]
    seeds = [run_training_seed(r["run"]) for r in rows]
    for internal, truth, sign in pairs():
        x, y = [r.get(internal) for r in rows], [r.get(truth) for r in rows]
        c = correlation_interval(x, y, draws, clusters=seeds)
        entry = ({"internal": internal, "ground_truth": truth, "expected_sign": sign} | c
                 | {"within_lr": within_group_spearman(x, y, rates, draws, clusters=seeds)})
        if truth == INDEPENDENT and internal in LEAKAGE_TRUTHS:
            entry["version"] = RELIABILITY
        if internal in LEAKAGE_VERSIONS:
            entry["version"] = LEAKAGE_VERSIONS[internal]
            entry["meets_target"] = bool(c["spearman_lo"] >= TARGET)
        out.append(entry)
    return add_varying_rate_reading({"runs": len(rows), "target": TARGET, "correlations": out,
                                     "per_rate": per_rate(rows, rates, draws),
                                     "layer_versions": layer_comparison(rows, rates, draws)}, rows, draws)


#: The within-rate reading is also given without each learning rate whose independent truth (64 images a run) varies
#: over its runs by less than one image, a standard deviation below 1/64: such runs cannot be ranked (at lr 1e-5 a
#: training seed's runs are its pivot plus noise). A rule chosen after the look, so both readings are reported.
MIN_TRUTH_SD = 1 / 64


def varying_rates(rows: list[dict], rates: list[float | None]) -> list[float]:
    """The learning rates (``rates[k]``: row k's) the second within-rate reading keeps: every rate but those whose
    :data:`INDEPENDENT` truth is known for two or more runs and varies less than :data:`MIN_TRUTH_SD` (``np.std``,
    as :func:`per_rate`'s truth's sd)."""
    kept = []
    for rate in sorted({r for r in rates if r is not None}):
        values = [row[INDEPENDENT] for row, r in zip(rows, rates)
                  if r == rate and isinstance(row.get(INDEPENDENT), (int, float))]
        if len(values) < 2 or float(np.std(values)) >= MIN_TRUTH_SD:
            kept.append(rate)
    return kept


def add_varying_rate_reading(summary: dict, rows: list[dict], draws: int = 2000) -> dict:
    """``summary`` (of ``rows``) with each leakage correlation's ``within_varying_lr`` (those against a
    :data:`LEAKAGE_TRUTHS` truth; the rule reads the leakage truth): the within-rate Spearman of ``within_lr`` over the
    :func:`varying_rates` only; and ``varying_rates``: the rates kept and left out, and the rule's threshold. Also
    what updates a summary written before this reading (its ``rows``)."""
    rates = [run_learning_rate(r["run"]) for r in rows]
    seeds = [run_training_seed(r["run"]) for r in rows]
    kept = varying_rates(rows, rates)
    groups = [rate if rate in kept else None for rate in rates]
    for entry in (c for c in summary["correlations"] if c["ground_truth"] in LEAKAGE_TRUTHS):
        x, y = [r.get(entry["internal"]) for r in rows], [r.get(entry["ground_truth"]) for r in rows]
        entry["within_varying_lr"] = within_group_spearman(x, y, groups, draws, clusters=seeds)
    left_out = sorted({r for r in rates if r is not None} - set(kept))
    return summary | {"varying_rates": {"kept": kept, "left_out": left_out, "min_truth_sd": MIN_TRUTH_SD}}


#: The truths :func:`layer_comparison` compares the layer versions against: the same generations', the independent one.
LAYER_TRUTHS = ("gt_leakage", INDEPENDENT)
#: ``lr`` of a :func:`layer_comparison` entry over all runs pooled, and of the one within a learning rate.
ALL_RATES, WITHIN_RATES = "all", "within"


#: The entry of :func:`layer_comparison` the stated tests of the finest layers read (``docs/method.md``, "Which
#: cross-attention layers"): 16x16 minus all layers, against the independent truth, all runs pooled.
LAYER_TEST = {"version": "attention_leakage_16x16", "ground_truth": INDEPENDENT, "lr": ALL_RATES}
#: Each stated set of runs that rule was applied to, by the training seeds and conditions (:func:`run_condition`)
#: of its runs, and how many runs it names.
STATED_LAYER_TESTS = {
    "the stated test": {"seeds": (42, 1, 2), "conditions": ("none", "half_angle-w10", "reg_images-w1"), "runs": 51},
    "the stated replication": {"seeds": (5, 6, 7), "conditions": ("class_endpoint-w10", "uniform_half-w10",
                                                           "half_angle_band-w10"), "runs": 45},
}


def run_condition(name: str) -> str | None:
    """The H3 condition of a run: its variant, with ``-w<weight>`` where the variant has a weight, else None."""
    key = _run_key(name)
    return None if key is None else key[0] if key[1] is None else f"{key[0]}-w{key[1]:g}"


def stated_layer_test(summary: dict) -> str | None:
    """The name in :data:`STATED_LAYER_TESTS` of the set ``summary``'s runs belong to (their training seeds
    are its seeds and their conditions among its conditions), else None."""
    runs = [row["run"] for row in summary.get("rows", [])]
    seeds, conditions = {run_training_seed(r) for r in runs}, {run_condition(r) for r in runs}
    return next((name for name, test in STATED_LAYER_TESTS.items()
                 if runs and seeds == set(test["seeds"]) and conditions <= set(test["conditions"])), None)


def layer_test_verdict(summary: dict) -> str | None:
    """The stated rule applied to ``summary``'s runs (None without the entry): "supported" where the interval of
    the difference (16x16 minus all layers, against the independent truth, all runs) lies above 0, "refuted"
    where it lies at or below 0, else "inconclusive"; with the figure and which stated set the runs are."""
    entry = next((c for c in summary.get("layer_versions", []) if all(c[k] == v for k, v in LAYER_TEST.items())), None)
    if entry is None:
        return None
    reading = _layer_rule(entry["difference_lo"], entry["difference_hi"])
    name = stated_layer_test(summary)
    whose = (f"{name}'s runs, {len(summary['rows'])} of {STATED_LAYER_TESTS[name]['runs']}" if name else
             "not a stated set of runs: " + "; ".join(f"{n}: training seeds {', '.join(map(str, t['seeds']))}"
                                                      for n, t in STATED_LAYER_TESTS.items()))
    return (f"{reading}: {entry['version']} minus all layers against {entry['ground_truth']}, {_num(entry['difference'])} "
            f"[{_num(entry['difference_lo'])}, {_num(entry['difference_hi'])}] over {entry['n']} runs ({whose})")


def _layer_rule(lo: float, hi: float) -> str:
    """The stated rule's reading of an interval of the difference: above 0, at or below 0, or reaching across it."""
    return "supported" if lo > 0 else "refuted" if hi <= 0 else "inconclusive"


def layer_test_small_sample(summary: dict) -> str | None:
    """The small-sample check of :func:`layer_test_verdict` (added after the stated tests, not part of their rule):
    the same difference computed in each training seed's runs on its own (the ``"seed <s>"`` entries), their mean
    with Student's t interval over the seeds, read with the rule's thresholds; None with fewer than two seeds."""
    from ..metrics.replication import student_interval

    per_seed = [c["difference"] for c in summary.get("layer_versions", []) if str(c["lr"]).startswith("seed ")
                and all(c[k] == v for k, v in LAYER_TEST.items() if k != "lr")]
    values = np.array(per_seed, dtype=np.float64)
    if np.isfinite(values).sum() < 2:
        return None
    check = student_interval(values)
    return (f"{_layer_rule(check.lo, check.hi)}: the mean of {int(np.isfinite(values).sum())} training seeds' differences "
            f"{_num(check.estimate)} [{_num(check.lo)}, {_num(check.hi)}] (Student's t over the seeds)")


def layer_comparison(rows: list[dict], rates: list[float | None], draws: int = 2000) -> list[dict]:
    """Each :data:`LAYER_VERSIONS` version the rows carry against the all-layers ``attention_leakage``, both
    correlated with each of :data:`LAYER_TRUTHS` on the same runs (those carrying the version): pooled over
    all runs (``lr`` :data:`ALL_RATES`), averaged within learning rates (:data:`WITHIN_RATES`; ``rates[k]``:
    row k's), inside each rate, over each training seed's runs (``lr`` ``"seed <s>"``), each condition's
    (``"condition <c>"``, :func:`run_condition`) and the runs above the lowest rate (``"above <rate>"``). Entries
    ``{"version", "ground_truth", "lr", "all_layers", "rho", "difference", "difference_lo", "difference_hi",
    "n"}``, the interval resampling runs (:func:`~pti_plugin.metrics.correlation.paired_spearman_difference`)."""
    from ..metrics.correlation import paired_spearman_difference

    out = []
    for version in LAYER_VERSIONS:
        scored = [(row, rate) for row, rate in zip(rows, rates) if isinstance(row.get(version), (int, float))]
        by_rate = sorted({rate for _, rate in scored if rate is not None})
        groups = [(ALL_RATES, scored, None), (WITHIN_RATES, scored, [rate for _, rate in scored])]
        groups += [(rate, [(row, r) for row, r in scored if r == rate], None) for rate in by_rate]
        seeds = [run_training_seed(row["run"]) for row, _ in scored]
        groups += [(f"seed {seed}", [m for m, s in zip(scored, seeds) if s == seed], None)
                   for seed in sorted({s for s in seeds if s is not None})]
        conditions = [run_condition(row["run"]) for row, _ in scored]
        groups += [(f"condition {c}", [m for m, k in zip(scored, conditions) if k == c], None)
                   for c in sorted({c for c in conditions if c is not None})]
        if len(by_rate) > 1:  # is the gain more than the barely trained end?
            groups.append((f"above {by_rate[0]:g}", [(row, r) for row, r in scored if r is not None and r > by_rate[0]], None))
        for truth in LAYER_TRUTHS:
            for label, members, group_of in groups:
                known = [isinstance(row.get(truth), (int, float)) for row, _ in members]  # --layers_only: no gt_leakage
                members = [m for m, k in zip(members, known) if k]
                group_of = None if group_of is None else [g for g, k in zip(group_of, known) if k]
                if len(members) < 3:
                    continue
                all_layers, mine, truths = ([row.get(key) for row, _ in members] for key in ("attention_leakage", version, truth))
                d = paired_spearman_difference(all_layers, truths, mine, truths, draws=draws, groups=group_of)
                out.append({"version": version, "ground_truth": truth, "lr": label, "all_layers": d["fewer"],
                            "rho": d["more"], "difference": d["difference"], "difference_lo": d["difference_lo"],
                            "difference_hi": d["difference_hi"], "n": d["n"]})
    return out


def add_independent_truth(rows: list[dict], parts: Path) -> None:
    """``rows[k][INDEPENDENT]``: the mean training-cell fraction of the H3 part of ``rows[k]["run"]`` (the run's
    name less its digest) in ``parts``, when there is one."""
    for row in rows:
        path = parts / f"{_run_cell(row['run'])}.json"
        if path.is_file():
            values = [v for v in json.loads(path.read_text())["in_training_cell"] if v is not None]
            row[INDEPENDENT] = sum(values) / len(values) if values else None


def compact_rows(rows: list[dict]) -> list[dict]:
    """Each row with only its run and the scores :func:`pairs` reads (what the committed summary keeps)."""
    keys = ["run", *dict.fromkeys(k for internal, truth, _ in pairs() for k in (internal, truth))]
    return [{k: r.get(k) for k in keys} for r in rows]


def check_committed_seeds(committed: dict, seeds: int) -> None:
    """Refuse (naming ``--seeds``) to add runs scored with ``seeds`` sampling seeds to ``committed`` rows
    scored with another number."""
    if committed.get("seeds") != seeds:
        raise SystemExit(f"error: --seeds {seeds}, but the committed summary's runs were scored with "
                         f"{committed.get('seeds')} sampling seeds: pass --seeds {committed.get('seeds')}, "
                         "or --replace to summarise only the runs under the folders")


def with_committed_rows(rows: list[dict], folders: list[str], committed: dict) -> tuple[list[dict], list[str], int]:
    """``rows`` (compact) plus the ``committed`` summary's rows of runs that ``rows`` lacks, the folders of
    both, and how many rows were kept (the caller checks :func:`check_committed_seeds` before scoring)."""
    fresh = {r["run"] for r in rows}
    kept = [r for r in committed.get("rows", []) if r["run"] not in fresh]
    merged = sorted(rows + kept, key=lambda r: r["run"])
    return merged, list(dict.fromkeys([*committed.get("folders", []), *folders])), len(kept)


def verdict(summary: dict) -> str:
    """The line that decides: the attention leakage against ``gt_leakage``, and whether it meets :data:`TARGET`."""
    c = next(c for c in summary["correlations"] if (c["internal"], c["ground_truth"]) == ("attention_leakage", "gt_leakage"))
    target = summary["target"]
    met, where = (("meets", "lies above") if c["spearman_lo"] >= target else
                  ("may meet", "reaches") if c["spearman_hi"] >= target else ("does not meet", "lies below"))
    return (f"attention leakage against the ground-truth leakage: Spearman {_rho(c)} over {c['n']} runs; it {met} the target "
            f"{target:g} (its interval {where} it)")


def _num(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"  # nan != nan


def _rho(c: dict) -> str:
    """``0.43 [0.30, 0.55]``: a Spearman entry's rho and interval."""
    return f"{_num(c['spearman'])} [{_num(c['spearman_lo'])}, {_num(c['spearman_hi'])}]"


def summary_lines(summary: dict) -> list[str]:
    """The report's Markdown: one row per pair, the leakage versions first."""
    varying = summary.get("varying_rates")
    head = ["internal metric", "version", "ground truth", "expected sign", "Spearman [95%, seeds resampled]",
            "Spearman within a learning rate [95%]"] + (["the same, rates where the truth varies [95%]"] if varying else [])
    head += ["Pearson", "runs"]
    lines = [f"Spearman's rho over {summary['runs']} LoRA runs (ground truth and internal metric from the same "
             f"generations); target for the attention leakage: rho >= {summary['target']:g}. Every leakage version "
             "the scorer computes is listed. *Within a learning rate*: rho inside each rate's runs, averaged with "
             "weights = runs; it leaves out the agreement that comes from barely and fully trained runs sitting apart "
             "on both. Intervals resample training seeds, each with all its runs (a seed's runs share its pivot)."
             + ("" if not varying else _varying_note(varying)), "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in summary["correlations"]:
        cells = [_within_text(c.get("within_lr"))] + ([_within_text(c.get("within_varying_lr"))] if varying else [])
        lines.append(f"| `{c['internal']}` | {c.get('version', 'proxy')} | `{c['ground_truth']}` | {c['expected_sign']:+d} | "
                     f"{_rho(c)} | {' | '.join(cells)} | {_num(c['pearson'])} | {c['n']} |")
    if summary.get("per_rate"):
        lines += ["", "By learning rate (Spearman over that rate's runs, interval over its training seeds; the truth's "
                  "spread says whether they differ enough to be ranked):", "",
                  "| lr | internal metric | ground truth | Spearman [95%] | truth's sd | runs | training seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['lr']:g} | `{c['internal']}` | `{c['ground_truth']}` | {_rho(c)} | {c['truth_sd']:.3f} | {c['n']} | "
                  f"{c.get('training_seeds', 'n/a')} |" for c in summary["per_rate"]]
    return lines + layer_lines(summary)


def _within_text(within: dict | None) -> str:
    return f"{_rho(within)} ({within['groups']} rates)" if within else "n/a"


def _varying_note(varying: dict) -> str:
    """The header's sentence on the second within-rate reading (:func:`add_varying_rate_reading`)."""
    left = ", ".join(f"{rate:g}" for rate in varying["left_out"]) or "none"
    return (f" *Rates where the truth varies*: the same average without each rate whose independent truth "
            f"(`{INDEPENDENT}`) varies over its runs by less than one image in 64 (sd below {varying['min_truth_sd']:.3f}; "
            f"left out: lr {left}), a rule chosen after the look, so both readings are given.")


def layer_lines(summary: dict) -> list[str]:
    """The Markdown of :func:`layer_comparison`'s entries (``summary["layer_versions"]``), [] without them."""
    if not summary.get("layer_versions"):
        return []
    verdict_line = layer_test_verdict(summary)
    lines = ([] if verdict_line is None else ["", f"The finest layers' stated test (`docs/method.md`), its rule on these runs: "
                                                  f"**{verdict_line}**."])
    check = layer_test_small_sample(summary) if verdict_line is not None else None
    if check is not None:
        lines[-1] += f" Small-sample check, read after the tests were stated: {check}."
    lines += ["", "One UNet resolution's cross-attention layers against all layers (`attention_leakage`), both against "
             "the same ground truth on the same runs; *lr*: all runs pooled, the mean rho within a learning rate, "
             "one rate's runs, or one training seed's; difference: the resolution's rho minus all layers', 95% "
             "bootstrap interval over the runs (within each rate for the within-rate rows):", "",
             "| version | against | lr | runs | rho, all layers | rho, this resolution | difference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    return lines + [f"| `{c['version']}` | `{c['ground_truth']}` | {c['lr'] if isinstance(c['lr'], str) else format(c['lr'], 'g')} | "
                    f"{c['n']} | {_num(c['all_layers'])} | {_num(c['rho'])} | "
                    f"{_num(c['difference'])} [{_num(c['difference_lo'])}, {_num(c['difference_hi'])}] |"
                    for c in summary["layer_versions"]]
