"""H4's verdict on the toy world, built from the interpolation paths' per-image readings.

The rule (README, "Interpolation paths (H4)"; ``docs/method.md``): for each prompt pair, each two
geometries and each measure (validity, end-attribute share), take per sampling seed the mean over the
*interior* fractions (0 < f < 1; fraction 0 and 1 are the prompts' own conditionings in every
geometry) of the image's 0/1 reading, and test the two geometries' paired difference (every geometry
generates the same seeds) with an exact sign-flip test (:func:`sign_flip_p`). With ``m`` comparisons:

- **differ** when some comparison has p < 0.05 / m (Bonferroni: one false alarm in 20 rebuilds at most);
- **no functional difference** when none has;
- **untestable** when no comparison could reach that level (the smallest p a sign-flip test over ``n``
  seeds can give is 2^(1-n)) or the paths have no interior fraction.

Each comparison also carries its 95% percentile bootstrap interval over the sampling seeds
(:func:`~pti_plugin.metrics.replication.paired_difference`; one model, no training-seed level).

:func:`checked_input` says why a record cannot give a verdict for the protocol's model (missing,
unreadable, another model's digest); :func:`protocol_model_digest` reads that model's digest
from the protocol's cell archives.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from ..metrics.replication import paired_difference

ALPHA = 0.05
#: The measures compared: (name in the report, key of the per-image readings in the record).
MEASURES = (("validity", "valid"), ("end share", "end"))
EXACT_UP_TO = 16  # seeds: every sign assignment enumerated (2^16); beyond, random flips


def sign_flip_p(differences, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p of the paired sign-flip test of mean(differences) = 0: the share of sign assignments
    whose |mean| is at least the observed one (exact up to :data:`EXACT_UP_TO` values, else ``draws``
    random assignments with the observed one counted). NaN values are dropped; 1.0 when none is left or
    every difference is 0."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    observed = abs(float(d.mean())) if d.size else 0.0
    if d.size == 0 or not np.any(d):
        return 1.0
    if d.size <= EXACT_UP_TO:
        signs = ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1) * 2.0 - 1.0
        return float(np.mean(np.abs(signs @ d) / d.size >= observed * (1 - 1e-9)))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(int(draws), d.size))
    count = int(np.sum(np.abs(signs @ d) / d.size >= observed * (1 - 1e-9)))
    return (1 + count) / (int(draws) + 1)


def path_means(geometry: dict) -> dict[str, np.ndarray]:
    """Per measure key, each sampling seed's mean reading over the interior fractions: float ``(seeds,)``
    (empty without an interior fraction)."""
    interior = [k for k, f in enumerate(geometry["fractions"]) if 0.0 < f < 1.0]
    return {key: np.asarray(geometry["hits"][key], dtype=np.float64)[interior].mean(axis=0) if interior
            else np.zeros(0) for _, key in MEASURES}


def comparisons(record: dict) -> list[dict]:
    """Every (pair, measure, two geometries): the paired difference a - b of the path means, its 95%
    sampling-seed interval, its sign-flip p and the number of seeds."""
    draws = int(record["settings"].get("bootstrap", 2000))
    out = []
    for pair in record["pairs"]:
        means = {kind: path_means(g) for kind, g in pair["geometries"].items()}
        for (name, key), (a, b) in itertools.product(MEASURES, itertools.combinations(means, 2)):
            x, y = means[a][key], means[b][key]
            row = {"pair": pair["name"], "measure": name, "a": a, "b": b, "seeds": int(x.size), "p": sign_flip_p(x - y)}
            if x.size:
                row |= paired_difference(x[None, :], y[None, :], draws=draws).to_dict()
            out.append(row)
    return out


def functional_verdict(record: dict) -> dict:
    """The rule's reading of ``record`` (module docstring): ``label`` (``differ``, ``no functional
    difference`` or ``untestable``), ``alpha`` (per comparison), ``comparisons`` and the ``significant``
    ones, ``reason`` for an untestable one."""
    rows = comparisons(record)
    alpha = ALPHA / max(len(rows), 1)
    seeds = min((row["seeds"] for row in rows), default=0)
    reading = {"alpha": alpha, "comparisons": rows, "significant": [r for r in rows if r["p"] < alpha]}
    if seeds == 0:
        return reading | {"label": "untestable", "reason": "the paths have no fraction between 0 and 1"}
    if 2.0 ** (1 - seeds) >= alpha:
        return reading | {"label": "untestable", "reason": f"with {seeds} sampling seeds no sign-flip p can fall below "
                                                           f"0.05/{len(rows)} = {alpha:.4f}"}
    return reading | {"label": "differ" if reading["significant"] else "no functional difference"}


def protocol_model_digest(results: Path) -> str | None:
    """The digest of the model the protocol's cells were measured on (its H1 cell archive's, else its H3
    one's ``measured_with``); None when neither archive records one."""
    from .cell_archive import H1_ARCHIVE, H3_ARCHIVE, read_archive

    for name in (H1_ARCHIVE, H3_ARCHIVE):
        measured_with, _, _ = read_archive(Path(results) / name)
        if (measured_with or {}).get("model_digest"):
            return measured_with["model_digest"]
    return None


def checked_input(path: Path, digest_key, protocol_digest: str | None) -> tuple[dict | None, str | None]:
    """The JSON record at ``path`` (None when missing or unreadable) and why it cannot give a verdict on the
    protocol's model (None when it can): missing, unreadable, measured on another model (``digest_key(record)``:
    its model digest, None when it records none) or the protocol's model unknown."""
    if not path.is_file():
        return None, f"`{path.name}` is missing"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"`{path.name}` cannot be read ({exc})"
    digest = digest_key(record)
    if protocol_digest is None:
        return record, ("the protocol's model is not recorded (no cell archive in the results folder), so the model "
                        f"`{path.name}` was measured on (digest {digest}) cannot be checked against it")
    if digest != protocol_digest:
        return record, (f"`{path.name}` was measured on another model (digest {digest or 'not recorded'}; the "
                        f"protocol's is {protocol_digest})")
    return record, None


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def comparison_table(reading: dict) -> list[str]:
    """A markdown table of the comparisons: one row per pair and measure, one column per two geometries."""
    rows = reading["comparisons"]
    columns = list(dict.fromkeys((r["a"], r["b"]) for r in rows))
    lines = ["| pair | measure (mean over the path) | " + " | ".join(f"{a} − {b}" for a, b in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for pair, measure in dict.fromkeys((r["pair"], r["measure"]) for r in rows):
        cells = {(r["a"], r["b"]): r for r in rows if (r["pair"], r["measure"]) == (pair, measure)}
        text = [f"{c['estimate']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}], p {fmt_p(c['p'])}" if "estimate" in c else "—"
                for c in (cells[key] for key in columns)]
        lines.append(f"| {pair} | {measure} | " + " | ".join(text) + " |")
    return lines


def functional_text(reading: dict) -> str:
    """The verdict's functional clause."""
    if reading["label"] == "untestable":
        return f"the functional comparison is untestable ({reading['reason']})"
    if reading["label"] == "no functional difference":
        return (f"no functional difference between the geometries (none of the {len(reading['comparisons'])} "
                f"paired comparisons has p < {reading['alpha']:.4f})")
    found = "; ".join(f"{r['a']} − {r['b']} on {r['pair']}, {r['measure']} {r['estimate']:+.3f} "
                      f"[{r['lo']:+.3f}, {r['hi']:+.3f}], p {fmt_p(r['p'])}" for r in reading["significant"])
    return f"the geometries differ ({found})"


def path_lines(record: dict, reading: dict | None, label: str) -> list[str]:
    """The interpolation paths' figures per geometry and, with per-image readings, the rule's comparisons."""
    lines = [f"Interpolation paths (`analysis/interpolation_paths.py`{label}, {record['settings']['seeds']} sampling "
             "seeds per point, intervals over sampling seeds only): lowest validity over pairs and fractions, steps where the end attribute's "
             "share falls beyond noise, and the fraction where it reaches 0.5:"]
    for geometry, figures in record["summary"].items():
        crossings = ", ".join(f"{pair} {value:.2f}" for pair, value in figures["crossing_fraction"].items()
                              if value is not None)
        lines.append(f"- `{geometry}`: validity {figures['min_validity']:.3f}, falls {figures['nonmonotone']}, "
                     f"half-way at {crossings}.")
    if reading is None:
        return lines + ["", "(No per-image readings in this record: the rule's paired comparisons need a rerun of "
                            "`analysis/interpolation_paths.py`.)"]
    return lines + ["", f"The rule's paired comparisons (per sampling seed, the mean over the interior fractions; "
                        f"difference with its 95% interval over sampling seeds and the sign-flip p; each decides at "
                        f"p < 0.05/{len(reading['comparisons'])} = {reading['alpha']:.4f}; a negative end-share "
                        "difference: the first geometry shows the end attribute over less of the path, i.e. switches "
                        "later):", "",
                    *comparison_table(reading), ""]


def ellipsoid_line(name: str, record: dict, label: str) -> str:
    """One toy encoder's ellipsoid statistics and what the rule reads (single-encoder records)."""
    if "cv_about_centre" not in record:
        return f"- Ellipsoid statistics, `{name}`{label}: one block per text encoder (its `ellipsoid.json`); " \
               f"the rule reads **{record.get('verdict')}**."
    shell = (record.get("shell_context") or {}).get("index", {})
    reference = f" (a Gaussian cloud of the same covariance: {shell['gaussian_cv']:.3f})" if "gaussian_cv" in shell else ""
    limit = "" if record.get("limit") is None else (
        f"; the rule's limit max({record['threshold']:g}, {record['eos_factor']:g} × CV(EOS)) = {record['limit']:.3f}, so it")
    return (f"- Ellipsoid statistics, toy encoder `{name}`{label}: norm CV about the centre at index {record['index']} "
            f"{record['cv_about_centre']:.3f}{reference}, at EOS {record['eos_cv_about_centre']:.3f}{limit or '; the rule'} "
            f"reads **{record['verdict']}** for this {record.get('width', '?')}-wide encoder (not evidence about CLIP ViT-L).")
