"""Per-step cost of the pivot-locality regulariser: LoRA steps with and without it, through the real trainer.

    OMP_NUM_THREADS=1 python benchmarks/pivot_locality_overhead.py [--repeats 5] [--skip-sd15]

Part 1, the tiny test model (32 px, batch 2): runs of a LoRA-only stage, interleaved
(off, on, on with noise latents, on with the anchor cache, off, on, ...), ``--repeats`` of each;
each run's per-step time is the median of its steps after one warm-up step. Printed: the median
over runs and their spread (min-max), and the ratio to "off". The tiny model is overhead-bound
(python, hooks, small kernels), so its ratios understate the compute cost.

Part 2, an SD1.5-architecture model with random weights (the real UNet: 860M parameters, 192 LoRA
modules; a CLIP ViT-L-sized text encoder with SD1.5's 49,408-row token table, over filler words; a small
VAE) at 256 px (32x32 latents), batch 1, one thread: one run with the regulariser on every 2nd step
(``every_n_steps = 2``), so regularised and plain steps alternate in the same process (step 0 is warm-up);
the regularised step is what ``every_n_steps = 1`` costs per step. Another run measures the anchor cache the same way with ``--sd15-cached``
(adds about 2 minutes). Nothing is downloaded: the model is built in memory and handed to the
trainer in place of its loader.

The batch size, ``num_samples`` and ``every_n_steps`` are fixed and printed. The last line reads
``tiny_ratio_batch=<x> tiny_ratio_noise=<y> tiny_ratio_cached=<z> sd15_ratio_batch=<w>``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pti_plugin.config_loading import build_config  # noqa: E402
from pti_plugin.hooks import Plugin, register_plugin  # noqa: E402
from pti_plugin.plugins.pivot_locality import PivotLocality  # noqa: E402
from pti_plugin.script_args import argument_parser, int_at_least, positive_int  # noqa: E402

register_plugin(PivotLocality)

BATCH = {"tiny": 2, "sd15": 1}
NUM_SAMPLES = 1
CONFIGS = {  # name -> plugin options (None: no plugin)
    "off": None,
    "on, latents=batch": {"latents": "batch"},
    "on, latents=noise": {"latents": "noise"},
    "on, noise + cache": {"latents": "noise", "anchor_pool": 16, "cache_anchors": True},
}


@register_plugin
class StepTimer(Plugin):
    """Wall time of every optimizer step (from the previous step's end), and whether it was regularised."""

    name = "bench_step_timer"
    steps: list[tuple[float, bool]] = []

    @dataclass
    class Options:
        pass

    def on_stage_start(self, state):
        self._last = time.perf_counter()

    def on_step_end(self, state, logs):
        now = time.perf_counter()
        StepTimer.steps.append((now - self._last, "loss/pivot_locality/mse" in logs))
        self._last = now


def _images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        s = size // 32
        ImageDraw.Draw(image).rectangle([(4 + 3 * i) * s, 4 * s, (16 + 3 * i) * s, 16 * s], fill=(220, 20, 20))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("an anime illustration of tok1")


def _run(raw: dict, check_paths: bool = True) -> list[tuple[float, bool]]:
    """Train ``raw`` (the trainer's own messages are kept out of the report) and return its step times."""
    from pti_plugin.trainer import Trainer

    StepTimer.steps = []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        Trainer(build_config(raw, check_paths=check_paths)).run()
    return list(StepTimer.steps)


def _pivot(folder: Path, width: int) -> Path:
    """A pivot away from its init word (the regulariser refuses a run whose pivot is its init word): a random embedding."""
    from safetensors.torch import save_file

    path = folder / "pivot.safetensors"
    save_file({"emb_params": 0.1 * torch.randn(1, width, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


def _preset(model: Path, data: Path, out: Path, size: int, batch: int, steps: int, options: dict | None,
            pivot: Path) -> dict:
    plugins = {}
    if options is not None:
        plugins["pivot_locality"] = {"num_samples": NUM_SAMPLES, "probe_every_n_steps": 0} | options
    plugins["bench_step_timer"] = {}  # last: its clock starts after the other plugins' on_stage_start
    return {
        "pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "resolution": size,
        "output_dir": str(out), "train_batch_size": batch, "cache_latents": True, "log_every_n_steps": 10_000,
        "network_dim": 4, "network_alpha": 4.0, "seed": 0, "weights": str(pivot),
        "stages": [{"name": "lora", "kind": "lora", "steps": steps, "learning_rate": 1e-3}], "plugins": plugins,
    }


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} s  ({min(values):.3f}-{max(values):.3f})"


def tiny(root: Path, repeats: int, steps: int) -> dict[str, float]:
    from pti_plugin.models.tiny import build_tiny_sd

    model = build_tiny_sd(root / "tiny_model", seed=0)
    _images(root / "tiny_data" / "2_tok1", 4, 32)
    pivot = _pivot(root, json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"])
    per_run: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(repeats):
        for i, (name, options) in enumerate(CONFIGS.items()):
            times = _run(_preset(model, root / "tiny_data", root / f"tiny_out_{r}_{i}", 32, BATCH["tiny"], steps + 1, options, pivot))
            per_run[name].append(statistics.median(t for t, _ in times[1:]))  # step 0: warm-up (and pool build)
    print(f"\ntiny model, 32 px, batch {BATCH['tiny']}, num_samples {NUM_SAMPLES}, every_n_steps 1, "
          f"{repeats} interleaved runs x {steps} steps (+1 warm-up), {torch.get_num_threads()} thread(s):")
    print(f"  {'config':22s} {'median s/step (min-max over runs)':>36s}   ratio")
    base = statistics.median(per_run["off"])
    ratios = {}
    for name, values in per_run.items():
        ratios[name] = statistics.median(values) / base
        print(f"  {name:22s} {_summary(values):>36s}   {ratios[name]:.2f}x")
    return ratios


def _sd15_model(root: Path):
    """An SD1.5-architecture model with random weights, in memory (UNet as SD1.5; ViT-L/14-sized text encoder with
    CLIP's token table, over filler words)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pti_plugin.models.loading import BaseModel
    from pti_plugin.models.sd15 import SD15Family
    from pti_plugin.models.single_file import CLIP_VOCAB_SIZE
    from pti_plugin.models.word_vocab import BOS, EOS, filler_words, write_tokenizer_files

    torch.manual_seed(0)
    words = filler_words(CLIP_VOCAB_SIZE)  # SD1.5's token table: 49,408 rows
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(words, root / "tokenizer"), local_files_only=True)
    unet = UNet2DConditionModel(  # SD1.5's configuration (v1-inference.yaml)
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS), eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    ))
    vae = AutoencoderKL(  # small, with SD's 8x downsampling and 4 latent channels (only encodes the 2 images once)
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=8, sample_size=256,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    return BaseModel(family=SD15Family(1), unet=unet, vae=vae, text_encoders=(text_encoder,), tokenizers=(tokenizer,),
                     noise_scheduler=scheduler, prediction_type="epsilon", source="random SD1.5 architecture")


def sd15(root: Path, steps: int, cached: bool) -> float:
    import pti_plugin.trainer as trainer_module

    started = time.perf_counter()
    pristine = _sd15_model(root)
    original = trainer_module.load_base_model
    trainer_module.load_base_model = lambda *args, **kwargs: copy.deepcopy(pristine)
    _images(root / "sd15_data" / "1_tok1", 2, 256)
    pivot = _pivot(root, pristine.text_encoder.config.hidden_size)
    ratio = float("nan")
    try:
        variants = {"latents=batch": {"latents": "batch"}}
        if cached:
            variants["noise + cache"] = {"latents": "noise", "anchor_pool": 2, "cache_anchors": True}
        print(f"\nSD1.5-architecture UNet, random weights, 256 px (32x32 latents), batch {BATCH['sd15']}, "
              f"num_samples {NUM_SAMPLES}, {torch.get_num_threads()} thread(s); regularised every 2nd step, "
              f"{steps} steps per run (model built in {time.perf_counter() - started:.0f} s):")
        for index, (name, options) in enumerate(variants.items()):
            raw = _preset(root, root / "sd15_data", root / f"sd15_out_{index}", 256, BATCH["sd15"], steps,
                          options | {"every_n_steps": 2}, pivot)
            times = _run(raw, check_paths=False)[1:]  # no model folder to check: built in memory; warm-up: step 0 (regularised: first UNet calls, the anchor pool's build)
            on = [t for t, regularised in times if regularised]
            off = [t for t, regularised in times if not regularised]
            variant_ratio = statistics.median(on) / statistics.median(off)
            print(f"  {name:15s} plain steps {_summary(off)}   regularised steps {_summary(on)}   ratio {variant_ratio:.2f}x")
            if name == "latents=batch":
                ratio = variant_ratio
    finally:
        trainer_module.load_base_model = original
    return ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="interleaved runs of each tiny-model config (>= 1; 5 or more for a stable median)")
    parser.add_argument("--tiny-steps", type=positive_int, default=3, help="measured steps per tiny run (after 1 warm-up; >= 1)")
    parser.add_argument("--sd15-steps", type=int_at_least(3), default=5,
                        help="steps of each SD1.5-architecture run, every 2nd regularised; the first is warm-up "
                             "(>= 3: one warm-up, then at least one plain and one regularised step)")
    parser.add_argument("--sd15-cached", action="store_true", help="also time the anchor cache on the SD1.5 architecture")
    parser.add_argument("--skip-sd15", action="store_true", help="tiny model only")
    parser.add_argument("--skip-tiny", action="store_true", help="SD1.5 architecture only")
    args = parser.parse_args(argv)
    if args.skip_sd15 and args.skip_tiny:
        parser.error("--skip-sd15 and --skip-tiny together would measure nothing")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the runs' warnings; restored below, as a caller (a test) may go on logging
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ratios = ({name: float("nan") for name in CONFIGS} if args.skip_tiny
                      else tiny(Path(tmp), args.repeats, args.tiny_steps))
            sd_ratio = float("nan") if args.skip_sd15 else sd15(Path(tmp), args.sd15_steps, args.sd15_cached)
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print(f"tiny_ratio_batch={ratios['on, latents=batch']:.3f} tiny_ratio_noise={ratios['on, latents=noise']:.3f} "
          f"tiny_ratio_cached={ratios['on, noise + cache']:.3f} sd15_ratio_batch={sd_ratio:.3f}")


if __name__ == "__main__":
    main()
