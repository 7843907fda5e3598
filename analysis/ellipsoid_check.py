"""Ellipsoid check: is a slerp about the centre legitimate at token index 5 (``tok1``)?

Embeds a sentence set with the model's text encoder and reports, for the studied index, for the
EOS token and for every index as a curve, the mean, standard deviation and coefficient of variation
(CV) of the output norm, about the origin and about the empirical centre; the exact LayerNorm check
(|xhat| / sqrt(d), 1 by construction: a consistency check, not evidence); and a verdict:

    supported when CV(index) <= max(threshold, eos_factor x CV(EOS))   (defaults 0.10 and 1.5)

with CV = std / mean of |h - centre| (see ``pti_plugin/ellipsoid/`` for every definition).

Writes into ``--out`` (default ``outputs/ellipsoid``): ``ellipsoid.json`` (all numbers),
``centre.safetensors`` (the centre file the pivot-locality plugin's ``centered`` geometry reads:
``centre_file = ".../centre.safetensors"``) and ``ellipsoid.png``. Prints a summary whose last line
is the verdict.

With several text encoders (SDXL) every figure is given per encoder, on that encoder's slice of the
conditioning (``encoders`` in the JSON, ``ellipsoid_<encoder>.png``); the centre file holds the
centre of the concatenated states ``[77, d1 + d2]``; the verdict is supported when every encoder's
is. SDXL's conditioning has no final LayerNorm, so the LayerNorm figures are absent and the output
says that the exact LayerNorm geometry does not apply: the norm CV about the centre at the index and
at EOS, per encoder, decides.

Usage: ``python analysis/ellipsoid_check.py [--model @embedded] [--sentences FILE] [--index 5]
[--template_words [add|only]] [--threshold 0.1] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pti_plugin import ellipsoid as E  # noqa: E402
from pti_plugin.atomic_io import atomic_write_bytes, atomic_write_text  # noqa: E402
from pti_plugin.input_checks import template_problem  # noqa: E402
from pti_plugin.script_args import (argument_parser, check_out_folder, device, finite_float_at_least, flag_message,  # noqa: E402
                                    int_at_least, positive_int)

DEFAULT_OUT = "outputs/ellipsoid"
#: The loader's preset keys this script's flags set (its errors name the flag).
MODEL_FLAGS = {"pretrained_model_name_or_path": "--model", "tokenizer_path": "--tokenizer_path",
               "single_file_config": "--single_file_config"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="@embedded", help="diffusers folder, single-file .safetensors/.ckpt, or @embedded")
    p.add_argument("--single_file_config", default="", help="config folder for a single-file checkpoint")
    p.add_argument("--tokenizer_path", default="", help="tokenizer folder for a single-file checkpoint")
    p.add_argument("--clip_skip", type=int, default=1, help="kohya's clip_skip (1 = last layer)")
    p.add_argument("--sentences", default="", help="text file (one sentence per line) or COCO-style captions JSON; "
                   "default: the built-in template x words set")
    p.add_argument("--index", type=int_at_least(1, "index 0 is BOS: its state is the same for every sentence"),
                   default=E.DEFAULT_INDEX, help="token index to study (5 = tok1 in the template)")
    p.add_argument("--template_words", nargs="?", const="add", default="off", choices=("off", "add", "only"),
                   help="also ('add', the bare flag) or only ('only') use T(word) prompts, so the index is a content word")
    p.add_argument("--template", default=E.DEFAULT_TEMPLATE, help="template T of the T(word) prompts")
    p.add_argument("--threshold", type=finite_float_at_least(0), default=E.DEFAULT_THRESHOLD, help="absolute CV threshold of the verdict")
    p.add_argument("--eos_factor", type=finite_float_at_least(0), default=E.DEFAULT_EOS_FACTOR,
                   help="the index passes when its CV is at most this times the EOS CV (or below --threshold)")
    p.add_argument("--max_sentences", type=int_at_least(2), default=None, help="keep a deterministic random subset of this many")
    p.add_argument("--batch_size", type=positive_int, default=64, help="sentences per text-encoder call")
    p.add_argument("--device", type=device, default="cpu", help="torch device of the text encoder(s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in set and of --max_sentences' subset")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder of ellipsoid.json, centre.safetensors and the plots")
    args = p.parse_args(argv)
    if problem := template_problem(args.template, "the word"):
        p.error(f"--template {args.template!r}: {problem}")
    if args.sentences:
        sentences = Path(args.sentences).expanduser()
        if not sentences.exists():
            p.error(f"--sentences {args.sentences}: no such file")
        if not sentences.is_file():
            p.error(f"--sentences {args.sentences}: not a file (a text file, one sentence per line, or a captions JSON)")
        try:
            sentences.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            p.error(f"--sentences {args.sentences}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        except OSError as exc:
            p.error(f"--sentences {args.sentences}: cannot be read ({exc.strerror or exc})")
        try:  # its sentences, read now: a file without any is named before the model loads
            E.read_sentences(sentences)
        except ValueError as exc:
            p.error(f"--sentences {exc}")
    check_out_folder(p, Path(args.out))
    return args


def plot_png(result: E.EllipsoidResult) -> bytes:
    """Norm distributions about the centre (index vs EOS) and CV / mean norm by token index, as PNG bytes (the
    outputs are written once all of them are made)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for radii, label, colour in (
        (result.index_radii, f"index {result.index} (n={result.index_radii.size})", "tab:blue"),
        (result.eos_radii, f"EOS (n={result.eos_radii.size})", "tab:orange"),
    ):
        if radii.size and radii.mean() > 0:
            cv = radii.std() / radii.mean()
            ax.hist(radii / radii.mean(), bins=40, alpha=0.55, density=True, color=colour, label=f"{label}, CV={cv:.3f}")
    ax.set_xlabel("|h - centre| / mean")
    ax.set_ylabel("density")
    ax.set_title("norm about the centre (relative)")
    ax.legend(fontsize=8)

    ax = axes[1]
    count = result.curves["count"]
    positions = np.arange(len(count))
    shown = count >= 2
    last = int(positions[shown].max()) + 1 if shown.any() else len(count)
    for kind, style in (("origin", "--"), ("centre", "-")):
        ax.plot(positions[:last], result.curves[kind]["cv"][:last], style, marker=".", label=f"about the {kind}")
    if result.eos_centre.cv is not None:
        ax.axhline(result.eos_centre.cv, color="tab:orange", lw=1, label=f"EOS about its centre ({result.eos_centre.cv:.3f})")
    if result.verdict["limit"] is not None:
        ax.axhline(result.verdict["limit"], color="red", lw=1, ls=":", label=f"verdict limit ({result.verdict['limit']:.3f})")
    ax.axvline(result.index, color="gray", lw=0.8)
    ax.set_xlabel("token index (words only; EOS/padding excluded)")
    ax.set_ylabel("CV of the norm (std / mean)")
    ax.set_title("CV by token index")
    ax.legend(fontsize=8)

    ax = axes[2]
    for kind, style in (("origin", "--"), ("centre", "-")):
        ax.plot(positions[:last], result.curves[kind]["mean"][:last], style, marker=".", label=f"mean norm about the {kind}")
    ax.axvline(result.index, color="gray", lw=0.8)
    ax.set_xlabel("token index")
    ax.set_ylabel("mean norm")
    twin = ax.twinx()
    twin.bar(positions[:last], count[:last], alpha=0.15, color="gray")
    twin.set_ylabel("sentences with a word there")
    ax.set_title("mean norm by token index")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(result.verdict["line"].replace("VERDICT: ", ""), fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _identity(args, model, results) -> dict:
    """The model's identity in the outputs: the text encoder's hash (one encoder), or each encoder's."""
    if len(results) == 1:
        return {"argument": args.model, "path": model.source, "model_digest": _model_digest(model.source),
                "text_encoder_hash": E.text_encoder_hash(model.text_encoder), "width": results[0].dim}
    hashes = {r.encoder: E.text_encoder_hash(te) for r, te in zip(results, model.text_encoders)}
    return {"argument": args.model, "path": model.source, "model_digest": _model_digest(model.source),
            "family": model.family.name, "text_encoder_hashes": hashes,
            "width": sum(r.dim for r in results), "widths": {r.encoder: r.dim for r in results}}


def _model_digest(source) -> str | None:
    """A diffusers folder's digest as the research protocol records its model (None for a single file)."""
    from pti_plugin.protocol.premise import model_digest

    try:
        return model_digest(Path(source))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _measure_lines(result: E.EllipsoidResult, prefix: str = "") -> list[str]:
    """The printed figures of one encoder's result: index, EOS and the Gaussian reference."""
    shell = result.shell
    return [
        f"{prefix}index {result.index}: mean norm {_fmt(result.index_origin.mean)} about the origin (CV {_fmt(result.index_origin.cv)}), "
        f"{_fmt(result.index_centre.mean)} about the centre (std {_fmt(result.index_centre.std)}, CV {_fmt(result.index_centre.cv)})",
        f"{prefix}EOS:     mean norm {_fmt(result.eos_origin.mean)} about the origin (CV {_fmt(result.eos_origin.cv)}), "
        f"{_fmt(result.eos_centre.mean)} about its centre (std {_fmt(result.eos_centre.std)}, CV {_fmt(result.eos_centre.cv)})",
        f"{prefix}Gaussian reference (CV a Gaussian cloud of the same covariance would have, 1/sqrt(2 d_eff)): "
        f"index {_fmt(shell['index']['gaussian_cv'])} (d_eff {_fmt(shell['index']['effective_dim'], 1)}), "
        f"EOS {_fmt(shell['eos']['gaussian_cv'])} (d_eff {_fmt(shell['eos']['effective_dim'], 1)})",
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    import torch

    from pti_plugin.models.loading import load_base_model

    model = load_base_model(args.model, clip_skip=args.clip_skip, single_file_config=args.single_file_config,
                            tokenizer_path=args.tokenizer_path)
    layers = min(te.config.num_hidden_layers for te in model.text_encoders)
    if args.clip_skip > layers:
        raise ValueError(f"--clip_skip {args.clip_skip}: the model's text encoder has {layers} layers; use 1 to {layers}")
    if args.index >= (length := model.tokenizer.model_max_length):
        raise ValueError(f"--index {args.index}: the model's prompts have {length} token positions; use 1 to {length - 1}")
    for te in model.text_encoders:
        te.to(args.device)
    # word lists are filtered by the first tokenizer (SDXL's two share CLIP's vocabulary)
    prompts = E.build_prompt_set(model.tokenizer, args.sentences or None, args.template_words, args.template,
                                 args.max_sentences, seed=args.seed)
    notes = []
    if args.template_words != "off":
        word_index = E.template_word_index(model.tokenizer, args.template)
        if word_index != args.index:
            notes.append(f"the template puts its word at index {word_index}, not at the studied index {args.index}")
    with torch.inference_mode():
        results = E.analyse_per_encoder(E.Encoder.from_base_model(model, args.device), prompts.sentences, index=args.index,
                                        threshold=args.threshold, eos_factor=args.eos_factor, batch_size=args.batch_size)
    identity = _identity(args, model, results)

    out = Path(args.out)
    several = len(results) > 1
    plots = {r.encoder: out / (f"ellipsoid_{r.encoder}.png" if several else "ellipsoid.png") for r in results}
    paths = {"json": out / "ellipsoid.json", "centre_file": out / "centre.safetensors"}
    paths |= {f"plot_{name}": path for name, path in plots.items()} if several else {"plot": plots[results[0].encoder]}
    report = _multi_encoder_report(results) if several else results[0].to_json()
    report.update(
        {
            "model": identity,
            "prompt_set": prompts.describe(),
            "notes": notes,
            "runtime_s": round(time.perf_counter() - start, 2),
            "outputs": {k: str(v) for k, v in paths.items()},
        }
    )
    # every output is made before any is written: a failure leaves an earlier run's files as they were
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    pngs = {r.encoder: plot_png(r) for r in results}
    out.mkdir(parents=True, exist_ok=True)
    E.save_result_centre_file(paths["centre_file"], results if several else results[0],
                              {"model": identity, "prompt_set": prompts.describe()})
    for encoder, png in pngs.items():
        atomic_write_bytes(plots[encoder], png)
    atomic_write_text(paths["json"], text)
    lines = (_multi_encoder_lines if several else _single_encoder_lines)(model, results, prompts, identity)
    lines += [f"note: {n}" for n in notes]
    lines += [f"rule: {results[0].verdict['rule']}", f"wrote {', '.join(str(v) for v in paths.values())} "
              f"in {report['runtime_s']:.1f} s"]
    lines += [f"VERDICT [{r.encoder}]: {r.verdict['line'].removeprefix('VERDICT: ')}" for r in results] if several else []
    lines.append(report["verdict_line"])
    print("\n".join(lines))
    return report


def _single_encoder_lines(model, results, prompts, identity) -> list[str]:
    (result,) = results
    ln = result.layernorm
    lines = [
        f"model: {model.source} (text encoder {identity['text_encoder_hash']}, width {result.dim}, clip_skip {result.clip_skip})",
        f"sentences: {prompts.name}: {len(prompts.sentences)} (hash {prompts.hash}); "
        f"{result.index_centre.n} with a word at index {result.index} ({result.distinct_at_index} distinct prefixes)",
        *_measure_lines(result),
    ]
    if ln.get("present"):
        lines.append(
            f"LayerNorm check (consistency, 1 by construction): |xhat|/sqrt(d) = {ln['whitened_norm_ratio_mean']:.6f} "
            f"(min {ln['whitened_norm_ratio_min']:.6f}, max {ln['whitened_norm_ratio_max']:.6f}); "
            f"conditioning = gamma*xhat+beta to {ln['reconstruction_relative_error']:.1e}"
        )
    else:
        lines.append("LayerNorm check: the text encoder has no final LayerNorm")
    return lines


def _multi_encoder_lines(model, results, prompts, identity) -> list[str]:
    widths = ", ".join(f"{r.encoder} {r.dim}" for r in results)
    lines = [
        f"model: {model.source} ({model.family.name}, {len(results)} text encoders: {widths}; clip_skip {results[0].clip_skip})",
        f"sentences: {prompts.name}: {len(prompts.sentences)} (hash {prompts.hash}); "
        f"{results[0].index_centre.n} with a word at index {results[0].index} ({results[0].distinct_at_index} distinct prefixes)",
    ]
    for r in results:
        lines.append(f"[{r.encoder}] (width {r.dim}, text encoder {identity['text_encoder_hashes'][r.encoder]})")
        lines += _measure_lines(r, prefix="  ")
        if r.layernorm.get("present"):
            lines.append(f"  LayerNorm check: |xhat|/sqrt(d) = {r.layernorm['whitened_norm_ratio_mean']:.6f}")
    if not all(r.layernorm.get("present") for r in results):
        lines.append(E.NO_LAYERNORM_LINE)
    return lines


def _multi_encoder_report(results: list[E.EllipsoidResult]) -> dict:
    """The JSON of a per-encoder check: the overall verdict, then one block per encoder (its
    ``to_json``, without the conventions, which are given once)."""
    overall = E.overall_verdict(results)
    blocks = {}
    offset = 0
    for r in results:
        block = r.to_json()
        block.pop("conventions")
        blocks[r.encoder] = {"encoder": r.encoder, "offset": offset, **block}
        offset += r.dim
    layernorm = all(r.layernorm.get("present") for r in results)
    return {
        "index": results[0].index,
        "verdict": overall["label"],
        "supported": overall["supported"],
        "verdict_line": overall["line"],
        "rule": results[0].verdict["rule"] + "; with several encoders: supported when every encoder's is",
        "threshold": results[0].threshold,
        "eos_factor": results[0].eos_factor,
        "num_sentences": results[0].num_sentences,
        "width": offset,
        "clip_skip": results[0].clip_skip,
        "layernorm_geometry": {"applies": layernorm, **({} if layernorm else {"note": E.NO_LAYERNORM_LINE})},
        "encoders": blocks,
        "conventions": E.CONVENTIONS_PER_ENCODER,
    }


def cli(argv: list[str] | None = None) -> int:
    """Run :func:`main`; a bad model path, sentence file or index ends with a one-line error (exit 2)."""
    from pti_plugin.config import ConfigError

    try:
        main(argv)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"ellipsoid_check: error: {flag_message(exc, MODEL_FLAGS)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
