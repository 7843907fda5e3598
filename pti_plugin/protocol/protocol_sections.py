"""The research protocol's report, section by section, from what is measured so far.

:func:`write_protocol_report` builds one section per hypothesis and hands them to
:func:`~.protocol_report.write_report`. Each section reads the protocol's working folder ``out``
(``analysis/research_protocol.py``'s parts) and, for what that folder no longer holds, the
committed results folder ``results``: a fresh clone has the committed summaries but none of the
training runs, so a report rebuilt there keeps every finished result.

- **H1** from the measured cells together with those archived in ``results/h1_cell_records.json``
  (:mod:`.cell_archive`) when the whole 1-vector grid is there, else from the committed
  ``h1_summary.json`` (the section says which);
- **H2** from ``out/h2/curves-lr<lr>/learning_curves.json``, each copied into ``results`` as
  ``h2_curves-lr<lr>.json`` so it can be re-read;
- **H3** from the measured cells (:func:`~.h3_variants.load_h3_cells`) together with those archived in
  ``results/h3_cell_records.json``, with its plot; a committed summary over more
  cells than both hold is kept;
- **H4** from the committed interpolation-path and ellipsoid results, its verdict by
  :mod:`.h4_verdict`'s rule and only for results measured on the protocol's model, and the
  position-decision band (``analysis/position_timesteps.py``) when present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write_text
from .protocol_report import h2_check, h2_lines, h2_overall, h2_threshold_line, h2_verdict, write_h1_files, write_report


def h1_section(out: Path, results: Path, h1, draws: int) -> tuple[dict, dict | None]:
    """H1's section and its null part (None when not measured here)."""
    from .cell_archive import H1_ARCHIVE, h1_cell_id, updated_archive
    from .h1_inversion import cell_name, load_cells
    from .h1_summary import summarise_h1

    null, measured = load_cells(out / "h1", h1)
    null, archive, _ = updated_archive(results / H1_ARCHIVE, null, measured, h1_cell_id)
    grid = {h1_cell_id({"lr": lr, "seed": seed, "vectors": vectors}) for lr, seed, vectors in h1.cells()}
    cells = [c for c in archive if h1_cell_id(c) in grid]  # this grid's cells (the archive may hold others)
    title = "H1: reconstruction against editability along the inversion learning rate"
    full_grid = {(lr, seed) for lr in h1.inversion_lrs for seed in h1.training_seeds}
    have = {(c["lr"], c["seed"]) for c in cells if c["vectors"] == 1}
    committed = results / "h1_summary.json"
    if have < full_grid and committed.is_file():  # a partial rerun must not replace the full result
        summary = json.loads(committed.read_text())
        note = (f"(From the committed `h1_summary.json`: this working folder and the cell archive hold {len(have)} "
                f"of the {len(full_grid)} 1-vector cells.)")
        return {"title": title, "lines": [note, "", *write_h1_files(results, summary)],
                "figures": [("H1 curves", results / "h1.png"), *_committed_grids(results)]}, null
    if not cells:
        raise SystemExit(f"error: no measured H1 cell under {out / 'h1'} and no committed {committed} (run h1 first)")
    summary = summarise_h1(null, cells, draws)
    section = {"title": title, "lines": write_h1_files(results, summary), "figures": [("H1 curves", results / "h1.png")]}
    grids = results / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    seed = h1.training_seeds[0]
    for lr in h1.inversion_lrs:
        source = out / "h1" / "parts" / f"{cell_name(lr, seed, 1)}.png"
        if source.is_file():
            shutil.copyfile(source, grids / source.name)
    return section | {"figures": section["figures"] + _committed_grids(results)}, null


def _committed_grids(results: Path) -> list[tuple[str, Path]]:
    def lr_of(path: Path) -> float:
        return float(path.stem.split("-lr")[1].split("-seed")[0])

    grids = sorted((results / "grids").glob("inversion-lr*-v1.png"), key=lr_of)
    return [(f"inversion lr {lr_of(g):g}, training seed {g.stem.split('-seed')[1].split('-')[0]}: 64 neutral "
             "images (4 rows) then 64 edit images (4 rows)", g) for g in grids]


def h2_section(out: Path, results: Path, null_hi: float | None) -> dict | None:
    """H2's table: every learning rate with learning curves, from ``out`` or the committed copies."""
    records: dict[str, dict] = {}
    for path in sorted(results.glob("h2_curves-lr*.json")):
        records[path.stem[len("h2_curves-lr"):]] = json.loads(path.read_text())
    for path in sorted((out / "h2").glob("curves-lr*/learning_curves.json")):
        lr = path.parent.name[len("curves-lr"):]
        records[lr] = json.loads(path.read_text())
        shutil.copyfile(path, results / f"h2_curves-lr{lr}.json")
        shutil.copyfile(path.with_suffix(".png"), results / f"h2_curves-lr{lr}.png")
    if not records:
        return None
    ordered = dict(sorted(records.items(), key=lambda item: float(item[0])))
    readings = {f"{float(lr):g}": h2_verdict(record["summary"], null_hi) for lr, record in ordered.items()}
    checks = {f"{float(lr):g}": h2_check(record["summary"], null_hi) for lr, record in ordered.items()}
    threshold = h2_threshold_line(ordered, null_hi)
    lines = [h2_overall(readings, checks), "", *([threshold, ""] if threshold else []), *h2_lines(ordered, null_hi)]
    figures = [(f"LoRA lr {lr}", results / f"h2_curves-lr{lr}.png")
               for lr in ordered if (results / f"h2_curves-lr{lr}.png").is_file()]
    return {"title": "H2: appearance before position along LoRA training", "lines": lines, "figures": figures}


def with_pivot_cells(cells: list[dict], h1_parts: Path, pivot_lr: float, base_drift: np.ndarray | None = None) -> list[dict]:
    """``cells`` plus, for every condition and training seed, the pivot alone as learning rate 0: the
    H1 cell at ``pivot_lr`` (the same neutral prompts and sampling seeds, LoRA off), whose drift is 0
    (no LoRA: the base model itself; ``base_drift``: the base model's drift images, for the class prompt's
    share of characters). Seeds without that H1 part get no lr-0 point; with its images, the lr-0 point
has each image's :func:`~.h3_lines.image_readings` too (``cell``, ``true_size_detail``)."""
    from .h1_inversion import cell_name
    from .h3_lines import image_readings
    from .h3_variants import drift_split

    out, detected = list(cells), {}
    for variant, weight in dict.fromkeys((c["variant"], c["weight"]) for c in cells):
        for seed in sorted({c["seed"] for c in cells if (c["variant"], c["weight"]) == (variant, weight)}):
            path = h1_parts / f"{cell_name(pivot_lr, seed, 1)}.json"
            if path.is_file():
                record = json.loads(path.read_text())
                no_drift = [0] * len(record["coarse"])
                images = path.with_suffix(".npz")
                if seed not in detected and images.is_file():
                    detected[seed] = image_readings(np.load(images)["images"][:len(no_drift)])
                record |= detected.get(seed, {})
                out.append(record | {"variant": variant, "weight": weight, "lr": 0.0, "seed": seed,
                                     "drift": no_drift, "drift_cell": no_drift} | drift_split(no_drift, base_drift))
    return out


def _cell_images(parts: Path, cell: dict) -> np.ndarray | None:
    """A cell's generations (its neutral images, then its drift images), or None without the part's npz."""
    from .h3_variants import cell_name

    path = parts / f"{cell_name(cell['variant'], cell['weight'], cell['lr'], cell['seed'])}.npz"
    return np.load(path)["images"] if path.is_file() else None


def measured_h3_cells(out: Path, null: dict | None, pivot_lr: float) -> tuple[dict | None, list[dict]]:
    """The working folder's H3 cells as the summary reads them (drift split, each neutral image's
    :func:`~.h3_lines.image_readings`, the pivots as lr 0), and H1's null part with its detected cells."""
    from .h3_lines import detected_cells, image_readings
    from .h3_variants import BASE_DRIFT_PART, drift_split, load_h3_cells

    cells = load_h3_cells(out / "h3")
    images = [_cell_images(out / "h3" / "parts", cell) for cell in cells]
    cells = [cell | drift_split(cell["drift"], None if generated is None else generated[len(cell["coarse"]):])
             | ({} if generated is None else image_readings(generated[:len(cell["coarse"])]))
             for cell, generated in zip(cells, images)]
    null_images = out / "h1" / "parts" / "null.npz"
    if null is not None and null_images.is_file():  # set a: the first images (measure_null)
        null = null | {"a": null["a"] | {"cell": detected_cells(np.load(null_images)["images"][:len(null["a"]["coarse"])])}}
    if not cells:
        return null, []
    base = out / "h3" / "parts" / f"{BASE_DRIFT_PART}.npz"
    base_drift = np.load(base)["images"] if base.is_file() else None
    return null, with_pivot_cells(cells, out / "h1" / "parts", pivot_lr, base_drift)


def h3_section(out: Path, results: Path, null: dict | None, draws: int, pivot_lr: float) -> dict:
    """H3's section: its summary (``h3_summary.json``) and plot, over the cells measured in ``out`` and
    those archived in ``results`` (:mod:`.cell_archive`). A summary over more cells than both hold (one
    from before the archive) is kept, not replaced."""
    from .cell_archive import H3_ARCHIVE, h3_cell_id, lora_cell_count, updated_archive
    from .h3_lines import h3_lines, h3_plot
    from .h3_summary import summarise_h3

    title = "H3: pivot locality against the other variants at matched reconstruction"
    null, measured = measured_h3_cells(out, null, pivot_lr)
    null, cells, archived = updated_archive(results / H3_ARCHIVE, null, measured, h3_cell_id,
                                            trained=lambda cell: cell["lr"] > 0,
                                            complete=lambda null: "cell" in null["a"])  # without null.npz: the archive's
    committed = results / "h3_summary.json"
    earlier = json.loads(committed.read_text()) if committed.is_file() else None
    lines, every_cell = [], cells
    if earlier is not None and earlier.get("n_cells", 0) > lora_cell_count(cells):
        summary, cells = earlier, []
        lines = [f"(From the committed `h3_summary.json` over {earlier['n_cells']} cells: this working folder holds "
                 f"{lora_cell_count(measured)} cells and the cell archive {lora_cell_count(archived)}.)", ""]
    elif cells:
        summary = summarise_h3(null, cells, draws) | {"n_cells": lora_cell_count(cells), "pivot_lr": pivot_lr}
        atomic_write_text(committed, json.dumps(summary, indent=1, default=str) + "\n")
    else:
        return {"title": title, "lines": ["**Verdict: not measured.** No LoRA cell (variant x weight x lr x training "
                                          "seed) is measured yet (`analysis/research_protocol.py h3`)."]}
    h3_plot(summary, results / "h3.png")
    figures = [("H3: leakage against reconstruction", results / "h3.png")]
    if cells:
        h3_cell_figures(out, results, cells)
    histograms = results / "h3_cells.png"
    if histograms.is_file():
        figures.append(("H3: where the object lands, per condition and learning rate", histograms))
    band = results / "position_timesteps.png"
    if band.is_file():
        figures.append(("Where the world decides positions (prompt switch, base model)", band))
    figures += [(f"H3 {g.stem[3:]}: 64 neutral images (4 rows), then 64 prompts without the pivot (4 rows)", g)
                for g in sorted((results / "grids").glob("h3-*.png"))]
    detail_lines, detail_figures = h3_detail_axis(results, null, every_cell, draws)
    return {"title": title, "lines": lines + h3_lines(summary) + detail_lines, "figures": figures + detail_figures}


def h3_detail_axis(results: Path, null: dict | None, cells: list[dict],
                   draws: int) -> tuple[list[str], list[tuple[str, Path]]]:
    """H3's secondary axis (:mod:`.h3_detail_axis`) over every archived or measured cell: written to
    ``h3_detail_axis.json`` and ``h3_detail_axis.png``; its lines and figure (none without a cell on it)."""
    from .h3_detail_axis import detail_axis_lines, detail_axis_plot, detail_axis_summary

    summary = detail_axis_summary(null, cells, draws)
    if not summary["conditions"]:
        return [], []
    atomic_write_text(results / "h3_detail_axis.json", json.dumps(summary, indent=1, default=str) + "\n")
    detail_axis_plot(summary, results / "h3_detail_axis.png")
    return (["", *detail_axis_lines(summary)],
            [("H3, secondary axis (after a look): leakage against the true-size detail", results / "h3_detail_axis.png")])


def h3_cell_figures(out: Path, results: Path, cells: list[dict]) -> None:
    """The cell histograms of every measured condition (``h3_cells.png``, from each cell's detected ``cell``
    list; lr 0: the pivots) and, for the first training seed, each condition's sample grid at its highest
    learning rate (``grids/h3-*.png``)."""
    from .cell_archive import h3_cell_id as cell_id
    from .h3_lines import _label, cell_counts, cell_histograms
    from .h3_variants import H3Settings, cell_key, cell_name

    counts: dict[str, dict[float, np.ndarray]] = {}
    for cell in cells:
        if "cell" in cell:
            per_lr = counts.setdefault(_label(cell["variant"], cell["weight"]), {})
            per_lr[cell["lr"]] = per_lr.get(cell["lr"], 0) + cell_counts(cell["cell"])
    cells = [c for c in cells if c["lr"] > 0]
    cell_histograms(counts, results / "h3_cells.png")
    grids = results / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    seeds = {c["seed"] for c in cells}
    first_seed = next((s for s in H3Settings().training_seeds if s in seeds), min(seeds))
    for label in counts:
        mine = [c for c in cells if _label(c["variant"], c["weight"]) == label and c["seed"] == first_seed]
        top = max(mine, key=lambda c: c["lr"]) if mine else None
        source = None if top is None else out / "h3" / "parts" / f"{cell_name(*cell_id(top))}.png"
        if source is None or not source.is_file():  # an archived cell: its condition keeps the grid it has
            continue
        for stale in grids.glob("h3-*.png"):  # the condition's grid from an earlier, smaller set of cells
            key = cell_key(stale.stem)
            if key is not None and key[:2] == cell_id(top)[:2]:
                stale.unlink()
        shutil.copyfile(source, grids / source.name)


def h4_section(results: Path) -> dict:
    """H4 from the committed interpolation-path and ellipsoid results (folders beside ``results``): the
    verdict is built by :mod:`.h4_verdict`'s rule, and only when both inputs are there and were measured on
    the protocol's model (the digest its cell archives record); otherwise a bold "No verdict" line says
    which input is missing or measured on another model, and the evidence present is still listed, labelled."""
    from .h4_verdict import (checked_input, ellipsoid_line, functional_text, functional_verdict, path_lines,
                             protocol_model_digest)

    root, digest = results.parent, protocol_model_digest(results)
    paths = root / "interpolation_paths" / "interpolation_paths.json"
    record, problem = checked_input(paths, lambda record: record.get("model_digest"), digest)
    problems, lines, ellipsoid, reading = [], [], None, None
    aside = (", **not the protocol's model: not part of the verdict**" if digest
             else ", **not checked against the protocol's model: not part of the verdict**")
    if problem:
        problems.append(f"{problem} (`python analysis/interpolation_paths.py --out {paths.parent.as_posix()}`)")
    if record is not None:
        has_hits = all("hits" in g for pair in record["pairs"] for g in pair["geometries"].values())
        reading = functional_verdict(record) if has_hits else None
        if reading is None and not problem:
            problems.append(f"`{paths.name}` has no per-image readings (rerun `analysis/interpolation_paths.py`)")
        lines += path_lines(record, reading, f", model {record.get('model_digest')}"
                            + (aside if problem else ""))
    for found in sorted((root / "ellipsoid_toy").glob("*/ellipsoid.json")):
        record, problem = checked_input(found, lambda record: (record.get("model") or {}).get("model_digest"), digest)
        if record is None:
            lines.append(f"- Ellipsoid statistics, `{found.parent.name}`: {problem}.")
            continue
        if problem is None and ellipsoid is None:
            ellipsoid = record
        own = (record.get("model") or {}).get("model_digest")
        lines.append(ellipsoid_line(found.parent.name, record, f" (model {own or 'not recorded'}{aside if problem else ''})"))
    if ellipsoid is None and digest is not None:
        problems.append(f"no ellipsoid result of the protocol's model (digest {digest}) under `ellipsoid_toy/` "
                        f"(`python analysis/ellipsoid_check.py --out {(root / 'ellipsoid_toy').as_posix()}/<name>`)")
    lines.append("- CLIP ViT-L with the ellipsoid paper's captions: **needs real weights** "
                 "(`python analysis/ellipsoid_check.py --model <local SD1.5 folder>`).")
    if problems:
        head = f"**No verdict: {'; '.join(problems)}.**"
    else:
        head = (f"**Verdict on the toy model ({digest}): {functional_text(reading)}; the ellipsoid rule reads "
                f"{ellipsoid['verdict']} at index {ellipsoid['index']} on its {ellipsoid.get('width', '?')}-wide text "
                "encoder, which is not evidence about CLIP ViT-L; on CLIP ViT-L H4 needs real weights.**")
    return {"title": "H4: is slerp at the pivot's token index legitimate?", "lines": [head, "", *lines]}


def internal_metrics_section(results: Path) -> dict | None:
    """The model-internal metrics against the ground truth (``internal_metrics.json``), when committed."""
    from .internal_metrics import summary_lines, verdict

    path = results / "internal_metrics.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    lines = [f"**Verdict: {verdict(summary)}.**", "", *summary_lines(summary), "",
             "Command: `OMP_NUM_THREADS=1 python analysis/internal_metrics.py outputs/protocol/h3/runs "
             "--out analysis/results/research_protocol`."]
    return {"title": "Model-internal metrics against the ground truth", "lines": lines + resolution_lines(results)}


def resolution_lines(results: Path) -> list[str]:
    """The layer comparisons committed under ``results/attention_layers`` (``internal_metrics.py --layers`` or
    ``--layers_only`` summaries), one block each: a stated set of runs (``STATED_LAYER_TESTS``) or exploratory."""
    from .internal_metrics import layer_lines, stated_layer_test

    lines = []
    for path in sorted((results / "attention_layers").rglob("internal_metrics.json")):
        summary = json.loads(path.read_text())
        kind = stated_layer_test(summary) or "exploratory"
        flag = "--layers_only" if summary.get("layers_only") else "--layers"
        lines += ["", f"**By UNet resolution, {kind}** (`{path.parent.relative_to(results).as_posix()}`: "
                  f"{summary['runs']} runs scored with {summary['seeds']} sampling seeds a prompt, "
                  f"`analysis/internal_metrics.py ... {flag}`):", *layer_lines(summary)]
    return lines


def timestep_lines(results: Path) -> list[str]:
    """The position-decision band (``position_timesteps.json``) when committed."""
    path = results / "position_timesteps.json"
    if not path.is_file():
        return []
    from .position_timesteps import band_resolution

    record = json.loads(path.read_text())
    settings, pairs = record["settings"], len({row["prompt_a"] for row in record["rows"]})
    resolution = band_resolution(record)
    measured, between = "", ""
    if resolution is not None:
        share = dict(zip(record["switch_timesteps"], record["share_first_cell"]))
        points = sorted({*resolution["high_bracket"], *resolution["low_bracket"]}, reverse=True)
        (h0, h1), (l0, l1) = resolution["high_bracket"], resolution["low_bracket"]
        read = ", ".join(f"{share[t]:.2f} at {t:.0f}" for t in points)
        measured = (f" by linear interpolation; measured only at the switch points ({read}), it crosses 0.1 between "
                    f"timesteps {h0:.0f} and {h1:.0f} and 0.9 between {l0:.0f} and {l1:.0f}, so each end is known only "
                    "to within the switch points around it")
        low, high = resolution["coverage_range"]
        between = f" by the interpolated ends (between {low:.0%} and {high:.0%} by the switch points alone)"
    return ["", f"Where the world decides positions (`analysis/position_timesteps.py`, base model, prompt switch; "
            f"{settings['seeds']} sampling seeds x {pairs} prompt pairs, {settings['sample_steps']} sampler steps, "
            f"a switch point every {settings['switch_every']}): the share of images keeping the first prompt's cell "
            f"goes from 0.1 to 0.9 between timesteps {record['t_high']:.0f} and {record['t_low']:.0f}{measured}. Pivot "
            f"locality's rows reuse the step's uniform training timesteps, so {record['regulariser_coverage']:.0%} "
            f"of them fall in that band{between}."]


def write_protocol_report(out: Path, results: Path, h1, draws: int, pivot_lr: float) -> Path:
    """The report of what ``out`` and ``results`` hold (see the module docstring)."""
    results.mkdir(parents=True, exist_ok=True)
    h1_part, null = h1_section(out, results, h1, draws)
    sections = [h1_part]
    null_hi = None
    if null is not None:
        from .h1_summary import null_summary

        null_hi = null_summary(null, draws)["training_cells_a"]["hi"]
    else:
        null_hi = ((json.loads((results / "h1_summary.json").read_text()).get("null") or {})
                   .get("training_cells_a", {}).get("hi"))
    h2 = h2_section(out, results, null_hi)
    if h2 is not None:
        sections.append(h2)
    h3 = h3_section(out, results, null, draws, pivot_lr)
    h3["lines"] = h3["lines"] + timestep_lines(results)
    sections += [h3, h4_section(results)]
    internal = internal_metrics_section(results)
    if internal is not None:
        sections.append(internal)
    return write_report(results, sections)


