"""The research protocol's report: Markdown, CSV, plots and one self-contained HTML page.

:func:`write_report` takes the H1 summary (:func:`~.h1_summary.summarise_h1`), the H2 learning-curve
records (``analysis/learning_curves.py``'s JSON, one per LoRA learning rate) and sample grids, and
writes into one folder ``report.md`` (the tables and verdict lines), ``h1_points.csv`` (one row per
learning rate), ``h1_summary.json``, ``h1.png`` and ``report.html``: the same content with every
plot and grid embedded as base64 PNG, so the page needs no network and no other file. The page
marks ``<body data-images-loaded="N">`` once loaded (a headless browser's DOM dump shows that every
image decoded: ``analysis/render_report.py``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write_text
from ..metrics.replication import student_interval
from .h1_summary import SCORES


def fmt(interval: dict | None, digits: int = 3) -> str:
    """``0.672 [0.531, 0.750]`` (or ``n/a``)."""
    if not interval or interval.get("estimate") is None:
        return "n/a"
    return f"{interval['estimate']:.{digits}f} [{interval['lo']:.{digits}f}, {interval['hi']:.{digits}f}]"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


# ------------------------------------------------------------------------------------------- H1
def h1_plot(summary: dict, path: Path) -> None:
    """Four panels against the output-space angle to the init word (log axis): reconstruction, joint
    editability, appearance error and the training-cell fraction beside the null's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    x = [max(r["output_angle_layernorm_deg"] or 0.0, 1e-3) for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = ((axes[0, 0], ("coarse", "detail"), "fraction of neutral images"),
              (axes[0, 1], ("joint_edit", "joint_background_edit", "edit"), "fraction of edit images"),
              (axes[1, 0], ("appearance_error",), "graded error (lower = better)"),
              (axes[1, 1], ("in_training_cell",), "objects in a training cell"))
    for ax, keys, label in panels:
        for key in keys:
            est = [r[key]["estimate"] for r in rows]
            err = [[e - r[key]["lo"] for e, r in zip(est, rows)], [r[key]["hi"] - e for e, r in zip(est, rows)]]
            ax.errorbar(x, est, yerr=err, marker="o", capsize=3, label=key)
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="upper left" if ax is axes[0, 0] else "best")  # fixed: the lr labels avoid it
    null = summary.get("null")
    if null:
        a = null["training_cells_a"]
        axes[1, 1].axhspan(a["lo"], a["hi"], color="grey", alpha=0.3, label="null (base model) 95%")
        axes[1, 1].legend(fontsize=8)
    knee = summary["knees"].get("output_angle_layernorm_deg", {})
    if knee.get("knee_x") is not None:
        for ax in axes.flat:
            ax.axvline(knee["knee_x"], color="k", linestyle=":", linewidth=1)
    for ax in axes[1]:
        ax.set_xlabel("output-space angle to the init word (deg, log)")
    fig.suptitle("H1: inversions along the learning rate (means over training seeds, 95% two-level intervals)",
                 fontsize=10)
    fig.tight_layout()
    label_points(axes[0, 0], [(xv, r["coarse"]["estimate"]) for r, xv in zip(rows, x)], [f"{r['lr']:g}" for r in rows],
                 [(xv, r[key][end]) for key in ("coarse", "detail") for end in ("estimate", "lo", "hi")
                  for r, xv in zip(rows, x)])  # the markers and the error bars' caps
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: Where a point's label may go, in points from it (right/left, up/down), tried in order.
LABEL_OFFSETS = ((4, -4), (4, 4), (-4, 4), (-4, -4), (4, -12), (4, 12), (-4, -12), (-4, 12),
                 (12, -20), (12, 20), (-12, -20), (-12, 20))


def label_points(ax, points: list[tuple[float, float]], labels: list[str], obstacles: list[tuple[float, float]],
                 fontsize: int = 6) -> list:
    """Annotate each of ``points`` (data coordinates) with its label at the first of :data:`LABEL_OFFSETS` whose box
    lies inside the axes and clear of the labels placed before, of the legend and of every marker in ``obstacles``
    (data coordinates); where none is clear, at the first offset. Measured on the drawn figure: call it once the
    layout is final. Returns the texts."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pad = 3 * fig.dpi / 72  # a marker's radius (markersize 6), in pixels
    marks = ax.transData.transform(np.asarray(obstacles, dtype=np.float64).reshape(-1, 2))
    frame = ax.get_window_extent(renderer)
    taken = [legend.get_window_extent(renderer) for legend in [ax.get_legend()] if legend is not None]

    def place(label: str, point: tuple[float, float], dx: float, dy: float):
        text = ax.annotate(label, point, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                           ha="left" if dx > 0 else "right", va="top" if dy < 0 else "bottom")
        return text, text.get_window_extent(renderer)

    def clear(box) -> bool:
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        return inside and not any(box.overlaps(other) for other in taken) and not any(
            box.x0 - pad < mx < box.x1 + pad and box.y0 - pad < my < box.y1 + pad for mx, my in marks)

    texts = []
    for point, label in zip(points, labels):
        for dx, dy in LABEL_OFFSETS:
            text, box = place(label, point, dx, dy)
            if clear(box):
                break
            text.remove()
        else:
            text, box = place(label, point, *LABEL_OFFSETS[0])
        taken.append(box)
        texts.append(text)
    return texts


def h1_table(summary: dict) -> list[str]:
    head = ["lr", "lr x steps", "seeds", "token L2", "output angle (deg)"] + list(SCORES) + ["training-cell excess"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in summary["rows"]:
        cells = [f"{r['lr']:g}", f"{r['lr_x_steps']:.3g}", str(r["n_seeds"]), _num(r["pivot_l2_from_init"]),
                 _num(r["output_angle_layernorm_deg"])] + [fmt(r[k]) for k in SCORES] + [fmt(r.get("training_cell_excess"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def h1_lines(summary: dict) -> list[str]:
    v = summary.get("verdict") or {}
    drops = "; ".join(f"{key} at lr {_num(d['farthest_lr'])} minus its best (lr {_num(d['best_lr'])}): "
                      f"{fmt(d['farthest_minus_best'])}" for key, d in (v.get("editability_drops") or {}).items())
    collapse = v.get("collapse_lr")
    lines = [f"**Verdict: {v.get('verdict', 'not measured')}.** Knee found: {v.get('knee_found')}. {drops}. "
             + (f"Collapse from lr {collapse:g} (left out of the verdict)." if collapse else "No collapse in the grid."),
             ""]
    if v.get("verdict_student"):
        checks = "; ".join(f"{key} {fmt(d['farthest_minus_best_student'])}" for key, d in v["editability_drops"].items())
        lines[-1:-1] = [f"Small-sample check ({SMALL_SAMPLE_CHECK}): {checks}; the rule reads "
                        f"**{v['verdict_student']}** with them."]
    lines += [knee_line(axis, knee) for axis, knee in summary["knees"].items()]
    null = summary.get("null")
    if null:
        lines.append(f"- Null (base model, init word, disjoint seed sets): training cells "
                     f"{fmt(null['training_cells_a'])} and {fmt(null['training_cells_b'])}; difference "
                     f"{fmt(null['difference_b_minus_a'])}.")
    lines += ["", *h1_table(summary), ""]
    if summary["vectors"]:
        lines += ["Vectors per token (the textual-inversion paper's check):", "",
                  "| vectors | lr | seeds | coarse | joint_edit | appearance_error |", "|" + " --- |" * 6]
        lines += [f"| {r['vectors']} | {r['lr']:g} | {r['n_seeds']} | {fmt(r['coarse'])} | {fmt(r['joint_edit'])} | "
                  f"{fmt(r['appearance_error'])} |" for r in summary["vectors"]]
    return lines


#: A BIC difference below this is no evidence either way: BIC's difference approximates twice the log Bayes factor,
#: and below 2 that is "not worth more than a bare mention" (Kass and Raftery, 1995).
BIC_NO_EVIDENCE = 2.0


def _grid_point(point: dict | None) -> str:
    if point is None:
        return "the grid's end"
    return _num(point["x"]) + ("" if point.get("lr") is None else f" (lr {point['lr']:g})")


def knee_line(axis: str, knee: dict) -> str:
    """One axis's knee with its learning rate and what its interval can say (Kneedle picks grid points: an interval
    of zero width is grid-limited), then the segment fits' reading (:func:`segment_reading`)."""
    interval, (below, above) = knee["interval"], knee.get("grid_neighbours") or (None, None)
    at = "" if knee.get("knee_lr") is None else f" at lr {knee['knee_lr']:g}"
    if interval and interval["lo"] == interval["hi"]:
        spread = (f"every resample over training seeds picks this grid point, {fmt(interval)}: a grid-limited interval, "
                  f"since Kneedle picks grid points; the grid places the knee no more finely than between "
                  f"{_grid_point(below)} and {_grid_point(above)}")
    else:
        spread = f"95% over training seeds: {fmt(interval)}, its bounds grid points"
    return (f"- Knee of coarse reconstruction against `{axis}`: {_num(knee['knee_x'])}{at} ({spread}; no knee in "
            f"{knee['no_knee_fraction']:.0%} of resamples). {segment_reading(knee['segments_coarse'])}")


def segment_reading(fits: dict) -> str:
    """What one line against two joined segments (:func:`~pti_plugin.metrics.curves.segment_fits`) says, by
    :data:`BIC_NO_EVIDENCE`: a difference below it is no evidence either way."""
    two, one = fits["two_segments"], fits["one_segment"]["bic"]
    if not two:
        return f"Two segments not fitted ({fits['n_points']} points)."
    gain = one - two["bic"]  # > 0: two segments fit better
    text = f"One line against two joined segments: BIC {_num(one)} against {_num(two['bic'])}"
    if abs(gain) < BIC_NO_EVIDENCE:
        return f"{text}, a difference of {abs(gain):.1f} (below {BIC_NO_EVIDENCE:g}): no evidence either way."
    if gain < 0:
        return f"{text}: one line preferred by {-gain:.1f}."
    return (f"{text}: two segments preferred by {gain:.1f}, breaking at {_num(two['breakpoint_x'])} (weak evidence "
            f"still: on {fits['n_points']} points BIC prefers two segments on many straight noisy lines, see "
            "`segment_fits`).")


def write_h1_csv(path: Path, summary: dict) -> None:
    buffer = io.StringIO()
    keys = ["lr", "lr_x_steps", "n_seeds", "pivot_l2_from_init", "pivot_angle_from_init_deg", "output_angle_layernorm_deg"]
    names = keys + [f"{k}_{p}" for k in [*SCORES, "training_cell_excess"] for p in ("estimate", "lo", "hi")]
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for r in summary["rows"]:
        flat = {k: r[k] for k in keys}
        for k in [*SCORES, "training_cell_excess"]:
            for p in ("estimate", "lo", "hi"):
                flat[f"{k}_{p}"] = (r.get(k) or {}).get(p)
        writer.writerow(flat)
    atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------- H2
def _plateau(curve: list, points: int = 3) -> float:
    values = [v for v in curve[-points:] if v is not None]
    return sum(values) / len(values) if values else float("nan")


POSITION_NOT_LEARNED = "position not learned"


#: How the verdict lines' small-sample check is computed and why it is there.
SMALL_SAMPLE_CHECK = ("Student's t over the training seeds, exact for normal per-seed values; in simulations where the "
                      "run-to-run spread dominates, the percentile bootstrap's 95% covered the truth in 73% of data sets "
                      "with 3 seeds and 85% with 5, Student's t in 93% and 94%")


def student_on_logs(ratios: list[float | None]) -> dict | None:
    """The small-sample check of a pooled ratio: Student's t interval of the runs' mean log ratio, back on the
    ratio scale (its estimate is the geometric mean); None with fewer than two usable runs."""
    logs = [math.log(r) for r in ratios if r is not None and r > 0]
    if len(logs) < 2:
        return None
    on_log = student_interval(logs)
    return {"estimate": math.exp(on_log.estimate), "lo": math.exp(on_log.lo), "hi": math.exp(on_log.hi)}


def _decisive_ratio(summary: dict) -> dict:
    """The T_pos / T_app record H2 is read on: the lower bound with every T_app at least the first save
    where the summary has it (summaries written before the bound have only the interpolated ratio)."""
    return summary.get("steps_ratio_from_first_save") or summary["steps_ratio"]


def _ratio_cell(summary: dict, axis: str) -> str:
    """The T_pos / T_app cell on ``axis`` ("steps" or "delta_norm"): the bound where some run's T_app fell
    before its first save (with the interpolated ratio beside), else the ratio."""
    interpolated, bounded = summary.get(f"{axis}_ratio"), summary.get(f"{axis}_ratio_from_first_save")
    if not interpolated:
        return "n/a"
    if not bounded or not bounded["before_first_save"]:
        return fmt(interpolated["ratio"], 2)
    return (f"≥ {fmt(bounded['ratio'], 2)} (T_app before the first save in {bounded['before_first_save']} of "
            f"{summary['n_runs']} runs; interpolated: {fmt(interpolated['ratio'], 2)})")


def h2_verdict(summary: dict, null_hi: float | None) -> str:
    """One learning rate's H2 reading on the bootstrap interval of T_pos / T_app (:func:`_h2_reading`)."""
    return _h2_reading(summary, null_hi, _decisive_ratio(summary)["ratio"])


def h2_check(summary: dict, null_hi: float | None) -> tuple[dict | None, str]:
    """One learning rate's small-sample check: T_pos / T_app's Student's t interval on the runs' log ratios
    (:func:`student_on_logs`) and the same reading on it."""
    interval = student_on_logs(_decisive_ratio(summary)["ratios"])
    return interval, _h2_reading(summary, null_hi, interval)


def _h2_reading(summary: dict, null_hi: float | None, ratio: dict | None) -> str:
    """One learning rate's H2 reading on the interval ``ratio`` of T_pos / T_app. Position counts as learned
    in a run when its training-cell plateau (mean of the last 3 saves) lies above the null's upper bound; a
    half-way time of a curve that never left the null's band is noise, so the ratio then says nothing."""
    learned = [null_hi is not None and _plateau(run) > null_hi for run in summary["position"]["per_run"]]
    if not any(learned):
        return f"{POSITION_NOT_LEARNED} (no run's plateau above the null): T_pos undefined"
    if not all(learned):
        return f"inconclusive: position learned in {sum(learned)} of {len(learned)} runs"
    if ratio is None:
        return "inconclusive: no usable ratio"
    return "holds" if ratio["lo"] > 1.0 else ("does not hold" if ratio["hi"] <= 1.0 else "inconclusive")


H2_RULE = ("per learning rate, H2 holds when every run learns position (its training-cell plateau lies above the "
           "null's upper bound) and the 95% interval of T_pos / T_app, each T_app taken as at least the first save, "
           "lies above 1, and does not hold when it lies at or below 1; supported when it holds at some rate and "
           "fails at none, not supported when it fails at some rate and holds at none, inconclusive otherwise")


def _held_failed(readings: dict[str, str]) -> tuple[list[str], list[str]]:
    """The learning rates at which H2 holds, and those at which it does not, from each rate's reading."""
    return ([lr for lr, reading in readings.items() if reading == "holds"],
            [lr for lr, reading in readings.items() if reading == "does not hold"])


def _h2_word(held: list[str], failed: list[str]) -> str:
    """:data:`H2_RULE`'s overall word from the rates at which H2 holds and those at which it does not."""
    return "supported" if held and not failed else "not supported" if failed and not held else "inconclusive"


def h2_overall(readings: dict[str, str], checks: dict[str, tuple[dict | None, str]] | None = None) -> str:
    """H2's verdict line from each learning rate's reading (:func:`h2_verdict`), by :data:`H2_RULE`; with
    ``checks`` (per rate, the Student's t interval of T_pos / T_app and the reading on it), the small-sample
    check after it."""
    held, failed = _held_failed(readings)
    parts = ([f"holds at lr {', '.join(held)}"] if held else []) + ([f"does not hold at lr {', '.join(failed)}"]
                                                                   if failed else [])
    parts += [f"{reading} at lr {lr}" for lr, reading in readings.items() if lr not in held + failed]
    line = f"**Verdict: {_h2_word(held, failed)}.** " + "; ".join(parts) + f". Rule: {H2_RULE}."
    if checks:
        read = "; ".join(f"lr {lr}: {reading}" if reading.startswith(POSITION_NOT_LEARNED) or not interval
                         else f"lr {lr} {fmt(interval, 2)}: {reading}" for lr, (interval, reading) in checks.items())
        word = _h2_word(*_held_failed({lr: reading for lr, (_, reading) in checks.items()}))
        line += (f" Small-sample check ({SMALL_SAMPLE_CHECK}; T_pos / T_app on the runs' log ratios): {read}; the "
                 f"rule reads **{word}** with them.")
    return line


def h2_threshold_line(records: dict[str, dict], null_hi: float | None) -> str | None:
    """Where H2's threshold comes from and what the rule reads on a reference from the curves' own prompts: the
    threshold is H1's null (the base model with the init word, on H1's four neutral templates), while the curves are
    scored on two prompts of their own, where the only figure without a LoRA is each curve's first point, the pivot
    alone (its interval over the runs' images, two-level). The rule of :func:`_h2_reading` read with that interval's
    upper bound in place of the threshold; None without a threshold or curves."""
    if null_hi is None or not records:
        return None
    pivots = {lr: record["summary"]["position"]["mean"][0] for lr, record in records.items()}
    readings = {f"{float(lr):g}": _h2_reading(record["summary"], pivots[lr]["hi"],
                                              _decisive_ratio(record["summary"])["ratio"])
                for lr, record in records.items()}
    alike = len({json.dumps(p, sort_keys=True) for p in pivots.values()}) == 1
    reference = (f"reads {fmt(next(iter(pivots.values())), 2)} at every rate (the same pivots)" if alike else
                 "reads " + "; ".join(f"{fmt(p, 2)} at lr {float(lr):g}" for lr, p in pivots.items()))
    read = "; ".join(f"lr {lr}: {reading}" for lr, reading in readings.items())
    return (f"The threshold {null_hi:.2f} is H1's null upper bound: the base model with the init word on H1's four "
            "neutral templates. The curves are scored on two neutral prompts of their own, on which no base-model figure "
            f"is committed; there the pivot alone (each curve's first point, before any LoRA step) {reference}. With "
            f"that upper bound in place of the threshold (not the stated rule): {read}; the rule would read "
            f"**{_h2_word(*_held_failed(readings))}**.")


def h2_lines(records: dict[str, dict], null_hi: float | None) -> list[str]:
    lines = ["| LoRA lr | runs | saves scored | appearance base -> plateau | training cells base -> plateau | T_app | "
             "T_pos | T_pos / T_app [95%] | same in ‖ΔW‖ | reading |", "|" + " --- |" * 10]
    for lr, record in records.items():
        s = record["summary"]
        app, pos = s["appearance"]["per_run"], s["position"]["per_run"]
        mean = lambda runs, f: sum(f(r) for r in runs) / len(runs)  # noqa: E731
        saves = s["steps"][1:]  # LoRA-stage steps; the first point is the pivot alone, not a save
        reading = h2_verdict(s, null_hi)
        timed = not reading.startswith(POSITION_NOT_LEARNED)  # else T_pos times a curve inside the null: noise
        lines.append(f"| {lr} | {s['n_runs']} | {len(saves)}, first at step {saves[0]:g} | "
                     f"{mean(app, lambda r: r[0]):.2f} -> {mean(app, _plateau):.2f} | "
                     f"{mean(pos, lambda r: r[0]):.2f} -> {mean(pos, _plateau):.2f} | {_num(s['t_app_mean'])} | "
                     + (f"{_num(s['t_pos_mean'])} | {_ratio_cell(s, 'steps')} | {_ratio_cell(s, 'delta_norm')} | "
                        if timed else "n/a | n/a | n/a | ") + f"{reading} |")
    return lines


# ------------------------------------------------------------------------------------------- page
def _png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _markdown_to_html(lines: list[str]) -> str:
    """The few Markdown forms the report uses: tables, bullets, bold, paragraphs."""
    out, table = [], []

    def inline(text: str) -> str:
        text = html.escape(text)
        while text.count("**") >= 2:
            text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
        while text.count("`") >= 2:
            text = text.replace("`", "<code>", 1).replace("`", "</code>", 1)
        return text

    def flush():
        if table:
            rows = [[c.strip() for c in r.strip("|").split("|")] for r in table if not set(r) <= set("|- ")]
            body = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</{'th' if i == 0 else 'td'}>"
                                            for c in row) + "</tr>" for i, row in enumerate(rows))
            out.append(f"<table>{body}</table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #bbb;padding:2px 6px}"
         "img{max-width:100%;image-rendering:pixelated}figure{margin:1em 0}figcaption{font-size:12px;color:#555}")
LOAD_SCRIPT = ("window.addEventListener('load',function(){var n=0;for(const i of document.images)"
               "{if(i.complete&&i.naturalWidth>0)n++;}document.body.dataset.imagesLoaded=n;"
               "document.body.dataset.imagesTotal=document.images.length;});")


def _relative(path: Path, folder: Path) -> str:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def write_report(out: Path, sections: list[dict]) -> Path:
    """``sections``: ``{"title", "lines": [markdown], "figures": [(caption, png path)]}`` in order;
    writes ``report.md`` and ``report.html`` into ``out`` and returns the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    md, body = ["# Research protocol on the toy world", ""], []
    for section in sections:
        md += [f"## {section['title']}", "", *section["lines"], ""]
        md += [f"![{caption}]({_relative(png, out)})" for caption, png in section.get("figures", [])] + [""]
        figures = "".join(f'<figure><img src="{_png_data(png)}" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                          for caption, png in section.get("figures", []))
        body.append(f"<h2>{html.escape(section['title'])}</h2>{_markdown_to_html(section['lines'])}{figures}")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Research protocol</title>"
            f"<style>{STYLE}</style><script>{LOAD_SCRIPT}</script></head><body>"
            f"<h1>Research protocol on the toy world</h1>{''.join(body)}</body></html>\n")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def write_h1_files(out: Path, summary: dict) -> list[str]:
    """``h1_summary.json``, ``h1_points.csv`` and ``h1.png`` into ``out``; returns the H1 section's lines."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "h1_summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    write_h1_csv(out / "h1_points.csv", summary)
    h1_plot(summary, out / "h1.png")
    return h1_lines(summary)
