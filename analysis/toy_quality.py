"""Measure the toy model's quality with the toy world's ground-truth detectors.

Loads a diffusers folder with the standard ``StableDiffusionPipeline`` (offline), generates one
image per evaluation prompt (fixed prompts and seeds, DDIM 25 steps, guidance 3), reads each with
the detectors and prints, as its last line::

    colour=<f> shape=<f> background=<f> position=<f> position_entropy=<f>

(fractions; ``position`` over prompts stating a cell; ``position_entropy`` = entropy of the 3x3
histogram of detected cells for prompts stating no position, divided by log 9). Also writes
``<out>/toy_quality.json`` and a sample grid ``<out>/toy_quality.png``.

Usage: ``python analysis/toy_quality.py [--model DIR] [--prompts N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from pti_plugin.toy_world import WEIGHTS_DIR  # noqa: E402
from pti_plugin.toy_world.detectors import score_generations  # noqa: E402
from pti_plugin.toy_world.train_recipe import generate, image_grid  # noqa: E402
from pti_plugin.toy_world.world import quality_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=WEIGHTS_DIR, help="diffusers folder (default: shipped weights)")
    parser.add_argument("--prompts", type=int, default=216, help="number of evaluation prompts (>= 100)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the prompt/seed list")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_quality"))
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = StableDiffusionPipeline.from_pretrained(str(args.model), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = quality_prompts(args.prompts, args.seed)
    t0 = time.time()
    images = generate(pipe, prompts, seeds, guidance_scale=args.guidance, num_inference_steps=args.steps)
    figures = score_generations(prompts, images)

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(args.model),
        "prompts": len(prompts),
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
    print(" ".join(f"{k}={figures[k]:.3f}" for k in ("colour", "shape", "background", "position", "position_entropy")))
    return figures


if __name__ == "__main__":
    main()
