#!/usr/bin/env python
"""Interpolation paths on the toy world (hypothesis H4: a slerp at the token index is legitimate).

Walks from one prompt's whole UNet conditioning (77 positions, each on its own path) to another's in
three geometries, ``layernorm`` (slerp of the normalised pre-LayerNorm states), ``centered`` (slerp
about the mean conditioning) and ``linear``, at evenly spaced fractions from 0 to 1; generates the
same seeds at every (geometry, fraction) (DDIM 25 steps, guidance 3) and reads each image with the
toy world's detectors (:mod:`pti_plugin.protocol.interpolation_paths`). Pairs: colour
(``a red circle`` -> ``a blue circle``), shape (-> ``a red square``), position (``... at the top left``
-> ``... at the bottom right``) and class word (``a character`` -> ``a circle``)::

    OMP_NUM_THREADS=1 python analysis/interpolation_paths.py [--model DIR] [--out DIR] [--seeds 16]
        [--fractions 11] [--quick]

Prints one line per pair and geometry, then H4's rule (:mod:`pti_plugin.protocol.h4_verdict`: per pair, measure
and two geometries, a paired sign-flip test of the per-seed means along the path, Bonferroni over the
comparisons: ``differ``, ``no functional difference`` or ``untestable``), then a last line
``layernorm_min_validity=<f> centered_min_validity=<f> linear_min_validity=<f> layernorm_nonmonotone=<n>
centered_nonmonotone=<n> linear_nonmonotone=<n>`` (validity: share of images with a detected object,
lowest over pairs and fractions; nonmonotone: steps, summed over pairs, where the end attribute's
share falls by more than 2 binomial standard errors). Writes ``interpolation_paths.json`` (every
figure, intervals over sampling seeds only: there is one model; each image's 0/1 readings, ``hits``; the
rule's comparisons, ``functional``; the model's ``model_digest``, which the research report matches
against the protocol's model), ``.csv`` (one row per pair,
geometry and fraction), ``interpolation_paths.png`` (validity and end share against the fraction)
and ``interpolation_paths_grid.png`` (seed 0 along every path) into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pti_plugin.atomic_io import atomic_write_csv, atomic_write_text  # noqa: E402
from pti_plugin.script_args import argument_parser, int_at_least, out_folder_problem, sd15_folder_problem  # noqa: E402
from pti_plugin.metrics.evaluate import json_ready  # noqa: E402
from pti_plugin.protocol.interpolation_paths import (DEFAULT_PAIRS, GEOMETRIES, PathSettings,  # noqa: E402
                                                     measure_paths)
from pti_plugin.toy_world import WEIGHTS_DIR  # noqa: E402
from pti_plugin.toy_world.world import IMAGE_SIZE  # noqa: E402

COLOURS = {"layernorm": "tab:blue", "centered": "tab:orange", "linear": "tab:green"}
DEFAULT_OUT = Path("outputs/interpolation_paths")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PathSettings]:
    defaults = PathSettings()
    parser = argument_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=WEIGHTS_DIR, help="diffusers folder (default: the shipped toy weights)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--seeds", type=int_at_least(2, "an interval needs two sampling seeds"), default=None,
                        help=f"sampling seeds 0..N-1 per fraction (default {defaults.seeds}, >= 2)")
    parser.add_argument("--fractions", type=int_at_least(2, "the start and the end"), default=None,
                        help=f"evenly spaced fractions from 0 to 1 (default {defaults.fractions}, >= 2)")
    parser.add_argument("--quick", action="store_true", help="4 seeds, 3 fractions, 2 DDIM steps (plumbing only)")
    args = parser.parse_args(argv)
    if problem := sd15_folder_problem(args.model, IMAGE_SIZE):
        parser.error(f"--model {args.model}: {problem}")
    if problem := out_folder_problem(args.out):
        parser.error(f"--out {args.out}: {problem}")
    _check_vocabulary(parser, args.model)
    settings = PathSettings.quick() if args.quick else defaults
    changes = {key: getattr(args, key) for key in ("seeds", "fractions") if getattr(args, key) is not None}
    return args, dataclasses.replace(settings, **changes)


def _check_vocabulary(parser: argparse.ArgumentParser, model: Path) -> None:
    """Every word of the pairs' prompts must be one known token of the model's tokenizer."""
    from pti_plugin.protocol.premise import check_init_word

    words = sorted({w for pair in DEFAULT_PAIRS for prompt in (pair.start, pair.end) for w in prompt.split()})
    for word in words:
        try:
            check_init_word(model, word)
        except (ValueError, OSError) as exc:
            parser.error(f"--model {model}: {exc}")


def csv_rows(record: dict) -> list[dict]:
    """One row per pair, geometry and fraction: each share with its interval."""
    rows = []
    for pair in record["pairs"]:
        for kind, g in pair["geometries"].items():
            for k, fraction in enumerate(g["fractions"]):
                row = {"pair": pair["name"], "attribute": pair["attribute"], "geometry": kind, "fraction": fraction,
                       "seeds": record["settings"]["seeds"]}
                for key in ("validity", "start_share", "end_share"):
                    share = g[key][k] or {}
                    row |= {key: share.get("estimate"), f"{key}_lo": share.get("lo"), f"{key}_hi": share.get("hi")}
                rows.append(row)
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_paths(record: dict, path: Path) -> None:
    """Validity (top row) and end-attribute share (bottom row) against the fraction; one panel per pair."""
    plt = _pyplot()
    pairs = record["pairs"]
    fig, axes = plt.subplots(2, len(pairs), figsize=(3.6 * len(pairs), 6), squeeze=False, sharey=True)
    for c, pair in enumerate(pairs):
        for r, key in enumerate(("validity", "end_share")):
            ax = axes[r][c]
            for kind, g in pair["geometries"].items():
                value = np.array([[s[f] for f in ("estimate", "lo", "hi")] for s in g[key]], dtype=np.float64)
                ax.plot(g["fractions"], value[:, 0], "o-", color=COLOURS[kind], markersize=3, label=kind)
                ax.fill_between(g["fractions"], value[:, 1], value[:, 2], color=COLOURS[kind], alpha=0.15)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"{pair['start']} ->\n{pair['end']}", fontsize=8)
            else:
                ax.axhline(0.5, color="gray", linewidth=0.6, linestyle=":")
                ax.set_xlabel("fraction")
            if c == 0:
                ax.set_ylabel("validity (object found)" if r == 0 else "share with the end attribute")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{record['settings']['seeds']} seeds per point (the same seeds everywhere); bands: 95% bootstrap "
                 "intervals over sampling seeds only (one model)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(record: dict, images: dict, path: Path) -> None:
    """Seed 0 along every path: one row per pair and geometry, one column per fraction."""
    from pti_plugin.toy_world.train_recipe import image_grid

    plt = _pyplot()
    rows = [(pair, kind) for pair in record["pairs"] for kind in GEOMETRIES]
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.0 + 0.55 * record["settings"]["fractions"], 0.75 * len(rows)),
                             squeeze=False)
    for ax, (pair, kind) in zip(axes[:, 0], rows):
        ax.imshow(image_grid(images[pair["name"]][kind][:, 0], columns=record["settings"]["fractions"]))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{pair['name']}\n{kind}", rotation=0, ha="right", va="center", fontsize=7)
    axes[-1, 0].set_xlabel("fraction 0 -> 1 (seed 0)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_line(summary: dict) -> str:
    parts = [f"{kind}_min_validity={summary[kind]['min_validity']:.3f}" for kind in GEOMETRIES]
    return " ".join(parts + [f"{kind}_nonmonotone={summary[kind]['nonmonotone']}" for kind in GEOMETRIES])


def main(argv: list[str] | None = None) -> dict:
    args, settings = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    record, images = measure_paths(args.model, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "interpolation_paths.json", json.dumps(json_ready(record), indent=1) + "\n")
    atomic_write_csv(args.out / "interpolation_paths.csv", csv_rows(record))
    plot_paths(record, args.out / "interpolation_paths.png")
    plot_grid(record, images, args.out / "interpolation_paths_grid.png")
    for pair in record["pairs"]:
        for kind, g in pair["geometries"].items():
            print(f"{pair['name']:>10} {kind:>9}: min validity {g['min_validity']:.3f} at {g['min_validity_fraction']:.2f}; "
                  f"end share {g['end_share'][0]['estimate']:.3f} -> {g['end_share'][-1]['estimate']:.3f}, "
                  f"nonmonotone steps {g['nonmonotone_steps']}, crosses 0.5 at {g['crossing_fraction']}")
    print(f"wrote {args.out}/interpolation_paths.json, .csv, .png, _grid.png ({record['images_generated']} images, "
          f"{record['cpu_seconds']:.0f} CPU s, {record['threads']} thread(s))")
    functional = record["functional"]
    print(f"H4 rule (paired sign-flip tests, p < {functional['alpha']:.4f} each): {functional['label']}"
          + (f" ({functional['reason']})" if "reason" in functional else ""))
    print(summary_line(record["summary"]))
    return record


if __name__ == "__main__":
    main()
