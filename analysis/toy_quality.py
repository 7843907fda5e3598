"""Measure the toy model's quality with the toy world's ground-truth detectors.

Loads a diffusers folder with the standard ``StableDiffusionPipeline`` (offline), generates one
image per evaluation prompt (fixed prompts and seeds, DDIM 25 steps, guidance 3), reads each with
the detectors and prints, as its last line::

    colour=<f> shape=<f> background=<f> position=<f> position_entropy=<f> two_tone=<f> (<what each is over>)

(fractions; ``position`` over prompts stating a cell; ``position_entropy`` = entropy of the 3x3
histogram of detected cells for prompts stating no position, divided by log 9; ``two_tone`` =
fraction of two-tone prompts of combinations pretraining shows whose object's top and bottom
halves have the asked colours, :func:`~pti_plugin.toy_world.world.two_tone_prompts`). For a model
whose tokenizer holds the look names it also prints ``named_two_tone=<f>``, the same on the same
scenes and seeds with each object stated by its name, the line before. Also writes
``<out>/toy_quality.json`` and a sample grid ``<out>/toy_quality.png``.

``--premise`` runs the toy world's premise checks instead
(:mod:`pti_plugin.protocol.premise`; resumable, results beside ``--out``).

Usage: ``python analysis/toy_quality.py [--model DIR] [--prompts N] [--two_tone_prompts N] [--out DIR]``
       ``python analysis/toy_quality.py --premise [--model DIR] [--out DIR] [--quick]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toml  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pti_plugin.script_args import (argument_parser, check_out_folder, finite_float_at_least, sd15_folder_problem,  # noqa: E402
                                    number_list, positive_finite, positive_int)
from pti_plugin.protocol.premise import (PremiseSettings, check_init_word, premise_line, run_premise,  # noqa: E402
                                         stops_cleanly)
from pti_plugin.toy_world import WEIGHTS_DIR  # noqa: E402
from pti_plugin.toy_world.detectors import score_generations  # noqa: E402
from pti_plugin.toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS  # noqa: E402
from pti_plugin.toy_world.train_recipe import generate, image_grid  # noqa: E402
from pti_plugin.toy_world.world import IMAGE_SIZE, LOOK_NAMES, quality_prompts, two_tone_prompts  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402 - after pti_plugin, which silences known library noise

BENCH_PRESET = Path(__file__).resolve().parents[1] / "presets" / "research_bench.toml"
PREMISE_HELP = {"init_word": "one word of the toy vocabulary", "inversion_lrs": "comma-separated learning rates",
                "inversion_steps": "a whole number >= 1", "lora_lrs": "comma-separated learning rates",
                "lora_steps": "a whole number >= 1", "oracle_steps": "a whole number >= 1",
                "seeds": "sampling seeds per model: a whole number >= 1"}
#: The premise options read as text (a word, comma-separated learning rates); the others are whole numbers >= 1.
PREMISE_TEXT = ("init_word", "inversion_lrs", "lora_lrs")
LINE_KEYS = ("colour", "shape", "background", "position", "position_entropy", "two_tone")


def premise_settings(parser: argparse.ArgumentParser, args) -> PremiseSettings:
    """The premise settings: ``--quick`` or the defaults, with the options given on the command line."""
    settings = PremiseSettings.quick() if args.quick else PremiseSettings()
    changes = {}
    for field in ("init_word", "inversion_lrs", "inversion_steps", "lora_lrs", "lora_steps", "oracle_steps", "seeds"):
        text = getattr(args, field)
        if text is None:
            continue
        if field == "init_word":
            if len(text.split()) != 1:
                parser.error(f"--init_word: one word of the toy vocabulary, got {text!r}")
            changes[field] = text
            continue
        if field not in PREMISE_TEXT:  # a whole number >= 1, already checked by its argparse type
            changes[field] = text
            continue
        try:
            changes[field] = positive_finite(number_list(text))
        except ValueError as exc:
            parser.error(f"--{field}: {exc}")
    return dataclasses.replace(settings, **changes)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=WEIGHTS_DIR, help="diffusers folder (default: shipped weights)")
    parser.add_argument("--prompts", type=positive_int, default=216, help="number of evaluation prompts (>= 1; 100 or more for a stable figure)")
    parser.add_argument("--two_tone_prompts", type=positive_int, default=72, help="number of two-tone evaluation prompts")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the prompt/seed list")
    parser.add_argument("--guidance", type=finite_float_at_least(0), default=GUIDANCE,
                        help="classifier-free guidance scale (a finite number >= 0; 1 or less: no guidance)")
    parser.add_argument("--steps", type=positive_int, default=SAMPLE_STEPS, help="DDIM steps per image (>= 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_quality"),
                        help="folder of toy_quality.json and .png (--premise: of premise/premise.json)")
    parser.add_argument("--premise", action="store_true", help="run the premise checks 2-4 (into <out>/premise)")
    parser.add_argument("--quick", action="store_true", help="with --premise: a few steps and seeds (plumbing only)")
    defaults = PremiseSettings()
    for field in ("init_word", "inversion_lrs", "inversion_steps", "lora_lrs", "lora_steps", "oracle_steps", "seeds"):
        parser.add_argument(f"--{field}", type=str if field in PREMISE_TEXT else positive_int, default=None,
                            help=f"with --premise: default {getattr(defaults, field)} ({PREMISE_HELP[field]})")
    args = parser.parse_args(argv)
    if problem := sd15_folder_problem(args.model, IMAGE_SIZE):
        parser.error(f"--model {args.model}: {problem}")
    check_out_folder(parser, args.out)
    premise_only = ["quick", "init_word", "inversion_lrs", "inversion_steps", "lora_lrs", "lora_steps", "oracle_steps", "seeds"]
    if not args.premise and (given := [f"--{k}" for k in premise_only if getattr(args, k) not in (None, False)]):
        parser.error(f"{', '.join(given)} set(s) the premise checks: add --premise (without it they would be ignored)")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.premise:
        settings = premise_settings(parser, args)
        try:
            check_init_word(args.model, settings.init_word)
        except ValueError as exc:
            parser.error(str(exc))
        with stops_cleanly():  # a stop signal: one line ("run the same command again"), exit 128 + signal
            result = run_premise(args.model, args.out / "premise", toml.load(BENCH_PRESET), settings)
        print(f"wrote {args.out / 'premise' / 'premise.json'}")
        print(premise_line(result["summary"]))
        return result["summary"]
    pipe = StableDiffusionPipeline.from_pretrained(str(args.model), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = quality_prompts(args.prompts, args.seed)
    tone_prompts, tone_seeds = two_tone_prompts(args.two_tone_prompts, args.seed)
    t0 = time.time()
    images = generate(pipe, prompts + tone_prompts, seeds + tone_seeds, guidance_scale=args.guidance,
                      num_inference_steps=args.steps)
    figures = score_generations(prompts, images[: len(prompts)])
    figures["two_tone"] = score_generations(tone_prompts, images[len(prompts):])["two_tone"]
    if knows_look_names(pipe.tokenizer):  # a model trained with look names: the same scenes, named
        named_prompts, _ = two_tone_prompts(args.two_tone_prompts, args.seed, named=True)
        named_images = generate(pipe, named_prompts, tone_seeds, guidance_scale=args.guidance, num_inference_steps=args.steps)
        figures["named_two_tone"] = score_generations(named_prompts, named_images)["two_tone"]

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(args.model),
        "prompts": len(prompts),
        "two_tone_prompts": len(tone_prompts),
        "seed": args.seed,
        "guidance_scale": args.guidance,
        "num_inference_steps": args.steps,
        "sampler": type(pipe.scheduler).__name__,
        "generation_seconds": round(time.time() - t0, 1),
        **figures,
    }
    (args.out / "toy_quality.json").write_text(json.dumps(record, indent=2) + "\n")
    Image.fromarray(image_grid(images[:96])).save(args.out / "toy_quality.png")
    print(f"wrote {args.out / 'toy_quality.json'} and {args.out / 'toy_quality.png'}")
    if "named_two_tone" in figures:
        print(f"named_two_tone={figures['named_two_tone']:.3f} (the two-tone prompts with look names)")
    print(" ".join(f"{k}={figures[k]:.3f}" for k in LINE_KEYS)
          + f" (fractions of the {len(prompts)} prompts' images, each over the prompts stating it; two_tone over "
          f"{len(tone_prompts)} two-tone prompts; position_entropy: of the cells drawn for prompts stating none, "
          "as a share of its maximum, log 9)")
    return figures


def knows_look_names(tokenizer) -> bool:
    """Whether every look name is one token of ``tokenizer`` (models trained after the names came)."""
    return all(len(tokenizer(name, add_special_tokens=False).input_ids) == 1 for name in LOOK_NAMES.values())


if __name__ == "__main__":
    main()
