"""Position leakage of a trained run: has fine-tuning taught the model the training images' layouts?

Usage::

    python analysis/position_leakage.py --run OUTPUT_DIR [--output_name NAME] [--n_seeds 8]
        [--prompts P ...] [--edit_prompts P ...] [--steps 25] [--guidance 7.5] [--out DIR] [--by_resolution]

Reads the run's resolved config (``<output_name>.config.toml``) to find the base model and the
training data, loads the base model with the run's LoRA and pivot, and generates ``n_seeds``
images (seeds 0..n-1, the same for both models) per prompt with

- the **base** model (LoRA off) prompted with the class word (the run's ``init_word``), and
- the **fine-tuned** model (LoRA on) prompted with the pivot token,

for neutral prompts (default ``T(tok1)`` and ``tok1 on a white background``) and
position-changing edit prompts (default ``T(tok1) at the top left`` / ``top right`` /
``bottom left`` / ``bottom right``); ``T`` is the run's caption template and a prompt names the
subject with ``{}`` or the token. The subject is localised in every generation by its
cross-attention heatmap (mean over layers and denoising steps), and in every training image
(encoded, noised to timestep 500, one UNet pass with the caption), once as the base model sees
it (token -> class word) and once as the fine-tuned model does; each model's generations are
compared with the training layouts as that model sees them.

Measures (``d`` = the layout distance: halved energy distance between the min-subtracted,
normalised heatmaps on a ``grid x grid`` resampling, in image fractions; for two point masses
it is their distance):

- (a) layout diversity ``D`` = mean over prompts of the mean pairwise ``d`` across seeds;
- (b) attraction distance ``A`` = mean over generations of ``d`` to the nearest training layout;
- each relative to the base model: ``r_D = D_tuned / D_base``, ``r_A = A_tuned / A_base``;
- (c) the leakage score ``L = 1 - sqrt(r_D * r_A)``: 0 = places the subject like the base model;
  1 = layouts collapsed (r_D = 0) or sitting on the training layouts (r_A = 0); negative = more
  varied / farther from the training layouts than the base model.

The headline ``leakage_score`` is the heatmap score of the **neutral** prompts (the version checked against
the toy world's ground truth: README, "Model-internal metrics"), with a 95% bootstrap interval over the
sampling seeds (:meth:`~pti_plugin.metrics.leakage.LeakageMeasurement.score_interval`; ``leakage_score_lo``,
``leakage_score_hi`` and ``n_seeds`` in the JSON); the heatmap score of all prompts (neutral + edit) is printed
and kept (``all_prompts_leakage_score``) as a secondary figure. The same numbers are computed per prompt group
(all, neutral, edit) and with centroid distances
(family ``centroid``); for edit prompts ``paired_distance`` (tuned vs base, same seed) shows whether
the edit still moves the subject as it moves the class word. On the toy world
(``--ground_truth auto`` detects its model), the toy world's detectors add a ``groundtruth``
family computed from the detected object centres.

``--by_resolution`` adds the neutral prompts' heatmap leakage from the cross-attention layers of each
UNet resolution alone (from the same sampling, no extra cost beyond the scoring; ``by_resolution`` in the
JSON); which
resolution tracks leakage best on the toy world: README, "Model-internal metrics".

Writes to ``--out`` (default ``OUTPUT_DIR/position_leakage``): ``position_leakage.json``
(summary, settings, per-image rows), ``position_leakage.csv`` (one row per generation and per
training image), ``position_leakage_centroids.png`` (centroid scatter: training, base,
fine-tuned) and ``position_leakage_grid.png`` (generations with heatmap overlays), and prints a
summary. Runs on CUDA when available (``--device`` to choose).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pti_plugin.atomic_io import atomic_write_csv, atomic_write_text, atomic_write_with  # noqa: E402
from pti_plugin.metrics.evaluate import json_ready  # noqa: E402
from pti_plugin.metrics.leakage import GROUPS, HEADLINE_GROUP, LeakageMeasurement, measure_position_leakage  # noqa: E402
from pti_plugin.metrics.prompts import NEUTRAL_PROMPTS, POSITION_EDIT_PROMPTS  # noqa: E402
from pti_plugin.metrics.run_model import load_run  # noqa: E402
from pti_plugin.script_args import argument_parser, check_out_folder, device, finite_float, int_at_least, positive_int  # noqa: E402

README_FRAGMENT = __doc__
#: The headline's interval: its level, the bootstrap's resamples and their random seed.
BOOTSTRAP = {"level": 0.95, "draws": 2000, "seed": 0}

EPILOG = ("The printed summary has one line per family (heatmap, centroid, groundtruth on the toy world) and prompt "
          "group (all, neutral, edit): D and A of each model, r_D, r_A and the leakage score; 'paired' (all and edit "
          "rows) is the mean layout distance between the two models' images of the same prompt and seed (on edit "
          "prompts, small: the edit moves the pivot's subject as it moves the class word's; large: the fine-tuned "
          "model places it elsewhere, e.g. keeps the training layouts); 'training base-vs-tuned observer' (all "
          "rows) is the mean distance between the base and the fine-tuned model's heatmaps of the same training "
          "image (how much the two instruments the attraction is measured with disagree; each model's generations "
          "are compared with its own reading). "
          "leakage_score= is the heatmap score of the neutral prompts with a 95% bootstrap interval over the "
          "sampling seeds (with 2 seeds it collapses onto the estimate).")


def toy_world_locator(run, mode: str):
    """The toy world's ground-truth locator when ``mode`` is "on", or "auto" and the run's model is the toy world's."""
    if mode == "off":
        return None
    try:
        from pti_plugin.toy_world import WEIGHTS_DIR
        from pti_plugin.toy_world.detectors import detect
    except Exception as exc:  # the toy world is optional
        if mode == "on":
            raise SystemExit(f"--ground_truth on: the toy world's detectors are unavailable ({exc})")
        return None
    if mode == "auto":
        from pti_plugin.models.loading import resolve_model_path

        model = resolve_model_path(run.config.pretrained_model_name_or_path).resolve()
        if model != Path(WEIGHTS_DIR).resolve():
            return None

    def locate(image: np.ndarray):
        found = detect(image)
        if found.centroid is None:
            return None
        return found.centroid[0] / image.shape[1], found.centroid[1] / image.shape[0]

    return locate


def save_figure(fig, path: Path) -> None:
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_centroids(m: LeakageMeasurement, path: Path, title: str) -> None:
    """Centroid scatter: training (crosses: black as the base model sees them, dark red as the
    fine-tuned one does), base (blue), fine-tuned (red); circles = neutral, triangles = edit prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("attention-heatmap centroids", m.centroids,
               {"training images, seen by base": ("black", m.training_centroids["base"]),
                "training images, seen by fine-tuned": ("darkred", m.training_centroids["tuned"])})]
    if m.groundtruth:
        gt = {k: np.array([[c if c is not None else (np.nan, np.nan) for c in row] for row in m.groundtruth[k]], float)
              for k in ("base", "tuned")}
        train = np.array([c if c is not None else (np.nan, np.nan) for c in m.groundtruth["training"]], float).reshape(-1, 2)
        panels.append(("ground-truth object centres (toy-world detectors)", gt, {"training images": ("black", train)}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.2), squeeze=False)
    for ax, (name, cents, trains) in zip(axes[0], panels):
        for model, colour, label in (("base", "tab:blue", "base (class word)"), ("tuned", "tab:red", "fine-tuned (token)")):
            for group, marker in (("neutral", "o"), ("edit", "^")):
                ks = [k for k, g in enumerate(m.groups) if g == group]
                if not ks:
                    continue
                pts = cents[model][ks].reshape(-1, 2)
                ax.scatter(pts[:, 0], pts[:, 1], c=colour, marker=marker, alpha=0.6, s=28,
                           label=f"{label}, {group} prompts")
        for label, (colour, train) in trains.items():
            ax.scatter(train[:, 0], train[:, 1], c=colour, marker="x", s=70, linewidths=2, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image coordinates: y downwards
        ax.set_aspect("equal")
        ax.set_xlabel("x (image fraction)")
        ax.set_ylabel("y (image fraction)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.13), ncol=2)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)
    plt.close(fig)


def plot_grid(m: LeakageMeasurement, path: Path, max_seeds: int = 8) -> None:
    """Rows: training images, then base and fine-tuned per prompt; heatmap overlay and centroid (+) on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pti_plugin.metrics.localisation import heatmap_stats

    seeds = min(max_seeds, len(m.seeds))
    n_train = min(len(m.training_images), max_seeds)
    rows = [("training", None, "base"), ("training", None, "tuned")]
    rows += [(model, k, None) for k in range(len(m.prompts)) for model in ("base", "tuned")]
    cols = max(seeds, n_train)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.35 * cols + 2.6, 1.45 * len(rows)), squeeze=False)
    for r, (model, k, observer) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if model == "training":
                if c >= n_train:
                    ax.axis("off")
                    continue
                image, heat = m.training_images[c], m.training_heatmaps[observer][c]
            else:
                if c >= seeds:
                    ax.axis("off")
                    continue
                image, heat = m.images[model][k, c], m.heatmaps[model][k, c]
            h, w = image.shape[:2]
            ax.imshow(image, extent=(0, w, h, 0))
            shown = heat.numpy()
            shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)
            ax.imshow(shown, cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
            stats = heatmap_stats(heat)
            ax.plot(stats.x * w, stats.y * h, "w+", markersize=9, markeredgewidth=2)
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            if c == 0:
                if model == "training":
                    label = "training, seen by\n" + ("base (class word)" if observer == "base" else "fine-tuned (token)")
                else:
                    who = "base" if model == "base" else "fine-tuned"
                    prompt = m.prompts[k] if model == "tuned" else m.prompts[k].replace(m.settings["token"], m.settings["class_word"])
                    label = f"{who} [{m.groups[k]}]\n" + "\n".join(_wrap(prompt, 26))
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
            if r == 2 and c < seeds:
                ax.set_title(f"seed {m.seeds[c]}", fontsize=7)
    fig.suptitle("subject cross-attention heatmaps (+ = centroid)", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def summary_lines(m: LeakageMeasurement) -> list[str]:
    lines = []
    for family, groups in m.summary.items():
        for group in GROUPS:
            if group not in groups:
                continue
            s = groups[group]
            line = (f"{family:>11} {group:>7}: diversity base {s['diversity_base']:.4g} tuned {s['diversity_tuned']:.4g} "
                    f"(r_D {s['diversity_ratio']:.3f}); attraction distance base {s['attraction_base']:.4g} "
                    f"tuned {s['attraction_tuned']:.4g} (r_A {s['attraction_ratio']:.3f}); leakage {s['leakage_score']:+.3f}")
            if "paired_distance" in s:
                line += f"; paired {s['paired_distance']:.4g}"
            if "training_observer_distance" in s:
                line += f"; training base-vs-tuned observer {s['training_observer_distance']:.4g}"
            if (family, group) == ("heatmap", HEADLINE_GROUP):
                line += "  <- the headline leakage_score"
            lines.append(line)
    return lines


def headline_lines(m: LeakageMeasurement, record: dict) -> list[str]:
    """The closing lines: ``--by_resolution``'s scores beside the headline's all-layer one (all of the neutral
    prompts), the secondary all-prompt score and the headline ``leakage_score=`` with its interval."""
    lines = []
    for grid, scores in record.get("by_resolution", {}).items():
        lines.append(f"{HEADLINE_GROUP} prompts, layers at {grid} only: leakage {scores['leakage_score']:+.3f} "
                     f"(r_D {scores['diversity_ratio']:.2f}, r_A {scores['attraction_ratio']:.2f})")
    if lines:
        headline = m.summary["heatmap"][HEADLINE_GROUP]
        lines.append(f"{HEADLINE_GROUP} prompts, every layer (the headline): leakage {m.score:+.3f} "
                     f"(r_D {headline['diversity_ratio']:.2f}, r_A {headline['attraction_ratio']:.2f})")
    lines.append(f"secondary: all_prompts_leakage_score={m.all_prompts_score:+.4f} (heatmaps, neutral + edit prompts; "
                 "ranked the toy world's runs less well than the headline)")
    lines.append(f"leakage_score={m.score:+.4f} [{record['leakage_score_lo']:+.4f}, {record['leakage_score_hi']:+.4f}] "
                 f"({HEADLINE_GROUP} prompts, n_seeds={record['n_seeds']})  "
                 "(0 = like the base model, 1 = layouts collapsed onto the training layouts)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(description=__doc__.split("\n")[0], epilog=EPILOG)
    parser.add_argument("--run", required=True, type=Path, help="the training run's output_dir")
    parser.add_argument("--output_name", default=None, help="which run, when the folder holds several")
    parser.add_argument("--n_seeds", type=int_at_least(2, "diversity compares seeds"), default=8,
                        help="images per prompt and model (seeds 0..n-1; >= 2)")
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--prompts", nargs="+", default=list(NEUTRAL_PROMPTS),
                        help="neutral prompts ({} or the token = the subject, {T} = the run's template)")
    parser.add_argument("--edit_prompts", nargs="*", default=list(POSITION_EDIT_PROMPTS), help="position-changing prompts")
    parser.add_argument("--class_word", default=None, help="the base model's subject (default: the run's init_word)")
    parser.add_argument("--steps", type=positive_int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale (the toy world uses 3)")
    parser.add_argument("--grid", type=positive_int, default=16, help="grid of the layout distance")
    parser.add_argument("--training_timestep", type=int_at_least(0), default=500)
    parser.add_argument("--ground_truth", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--device", type=device, default=None)
    parser.add_argument("--fp16", action="store_true", help="run the models in float16 (CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/position_leakage")
    parser.add_argument("--by_resolution", action="store_true",
                        help="also the neutral prompts' leakage from each UNet resolution's cross-attention layers alone")
    args = parser.parse_args(argv)

    out = args.out or args.run / "position_leakage"
    check_out_folder(parser, out, "--out" if args.out else "--run")  # before the measurement, not after it
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    t0 = time.time()
    try:
        run = load_run(args.run, args.output_name, device=args.device,
                       dtype=torch.float16 if args.fp16 else torch.float32, class_word=args.class_word)
    except (FileNotFoundError, ValueError) as error:  # no run there, an unfinished one, or several
        parser.error(f"--run {args.run}: {error}")
    locate = toy_world_locator(run, args.ground_truth)
    seeds = list(range(args.first_seed, args.first_seed + args.n_seeds))
    m = measure_position_leakage(
        run, args.prompts, args.edit_prompts, seeds, args.steps, args.guidance, args.grid,
        training_timestep=args.training_timestep, locate=locate, log=lambda s: print(s, flush=True),
        by_resolution=args.by_resolution,
    )
    interval = m.score_interval(**BOOTSTRAP)
    record = {
        "leakage_score": m.score, "leakage_score_lo": interval.lo, "leakage_score_hi": interval.hi,
        "leakage_score_prompts": f"heatmap, {HEADLINE_GROUP} prompts", "n_seeds": len(seeds),
        "leakage_score_interval": BOOTSTRAP | {"method": "percentile bootstrap over the sampling seeds"},
        "all_prompts_leakage_score": m.all_prompts_score,
        "formula": "leakage = 1 - sqrt(r_D * r_A); r_D = D_tuned / D_base (layout diversity across seeds), "
                   "r_A = A_tuned / A_base (mean distance to the nearest training layout)",
        "summary": m.summary,
        "run": str(args.run.resolve()),
        "lora": str(run.lora_path),
        "base_model": run.config.pretrained_model_name_or_path,
        "settings": m.settings | {"seeds": seeds, "prompts": m.prompts, "groups": m.groups,
                                  "ground_truth": bool(m.groundtruth), "device": str(run.device),
                                  "dtype": str(run.dtype).replace("torch.", "")},
        "rows": m.rows,
    }
    if args.by_resolution:
        record["by_resolution"] = m.by_resolution
    record["seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "position_leakage.json", json.dumps(json_ready(record), indent=2) + "\n")
    atomic_write_csv(out / "position_leakage.csv", m.rows)
    headline = m.summary["heatmap"][HEADLINE_GROUP]
    title = f"{args.run.name}: leakage score {m.score:+.3f}, {HEADLINE_GROUP} prompts (r_D {headline['diversity_ratio']:.2f}, " \
            f"r_A {headline['attraction_ratio']:.2f})"
    plot_centroids(m, out / "position_leakage_centroids.png", title)
    plot_grid(m, out / "position_leakage_grid.png")
    print("\n".join(summary_lines(m)))
    print("\n".join(headline_lines(m, record)))
    print(f"wrote {out}/position_leakage.json, .csv, _centroids.png, _grid.png")
    return record


if __name__ == "__main__":
    main()
