"""The GPU-only paths, checked on a CUDA machine: each a short two-stage run, with its peak memory.

    python benchmarks/gpu_check.py [--work DIR] [--sdxl_memory]

Without a CUDA device it prints ``no CUDA device: nothing to check`` and exits 0 (the test suite never
needs a GPU). With one, it builds the tiny SD1.5- and SDXL-shaped models (``pti_plugin.models.tiny``,
``tiny_sdxl``) and runs, for each family, 2 inversion + 2 LoRA steps (text-encoder LoRA on) with:
fp16 (trainable float32 + gradient scaler), bf16, xformers (when installed), AdamW8bit,
PagedAdamW8bit, gradient checkpointing, kohya's full_bf16, fp8_base (bf16), fp8_base_unet (fp16) and
torch_compile (inductor), and (SD1.5) an fp16 resume whose gradient scaler continues the saved one's
(``check_fp16_resume``). Each line: the case, ``ok`` or the error, the run's wall seconds
divided by its steps (loading and latent caching included: a smoke check, not a speed benchmark),
peak CUDA memory, and whether every saved tensor is finite.

``--sdxl_memory`` adds the number the SDXL presets promise: the SDXL 1.0 architecture with random
weights (from the configs shipped in ``pti_plugin/models/configs/sdxl``) trained at 1024 px, batch 1,
with ``presets/sdxl_base.toml``'s memory savers (bf16, gradient checkpointing, cached latents,
AdamW8bit, UNet LoRA rank 16), 1 inversion and 4 LoRA steps; it prints the run's peak CUDA memory.
The last line reads ``gpu_check: <passed>/<cases> passed``.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pti_plugin.script_args import argument_parser  # noqa: E402

CASES = {
    "fp16": {"mixed_precision": "fp16"},
    "bf16": {"mixed_precision": "bf16"},
    "xformers": {"xformers": True, "sdpa": False},
    "AdamW8bit": {"optimizer_type": "AdamW8bit"},
    "PagedAdamW8bit": {"optimizer_type": "PagedAdamW8bit"},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "full_bf16": {"mixed_precision": "bf16", "full_bf16": True},
    "fp8_base_bf16": {"mixed_precision": "bf16", "fp8_base": True},
    "fp8_base_unet_fp16": {"mixed_precision": "fp16", "fp8_base_unet": True},
    "torch_compile": {"torch_compile": True, "dynamo_backend": "inductor"},
}


def write_images(folder: Path, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        s = size / 32
        ImageDraw.Draw(image).ellipse([(4 + 3 * i) * s, 4 * s, (16 + 3 * i) * s, 16 * s], fill=(220, 120, 20))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("an anime illustration of tok1")
    return folder.parent


def run_case(model: Path, data: Path, out: Path, options: dict, stages: list[dict], resolution: int) -> dict:
    """One run; returns its wall seconds per step (loading included), peak CUDA memory (GiB) and whether the outputs are finite."""
    from safetensors.torch import load_file

    from pti_plugin.config_loading import build_config
    from pti_plugin.trainer import Trainer

    raw = {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "resolution": resolution,
           "output_dir": str(out), "train_batch_size": 1, "cache_latents": True, "network_dim": 4, "network_alpha": 4.0,
           "init_word": "character", "save_precision": "float", "log_every_n_steps": 10**6, "stages": stages} | options
    gc.collect()  # the previous case's tensors, so that this peak is this run's own
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        outputs = Trainer(build_config(raw)).run()
    seconds = (time.perf_counter() - start) / sum(s["steps"] for s in stages)
    finite = all(torch.isfinite(t.float()).all() for path in (outputs["lora"], outputs["embedding"])
                 for t in load_file(path).values())
    return {"s_per_step": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "finite": bool(finite)}


def check_fp16_resume(model: Path, data: Path, out: Path, resolution: int) -> str:
    """fp16's gradient scaler goes with a state: a run of 2 inversion steps saving a state at each, resumed from
    step 1, ends with the uninterrupted run's scaler state (``scaler.pt``: loss scale and growth tracker) at step 2.
    Returns "" or what differs."""
    from pti_plugin.config_loading import build_config
    from pti_plugin.trainer import Trainer

    raw = {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "resolution": resolution,
           "train_batch_size": 1, "cache_latents": True, "init_word": "character", "log_every_n_steps": 10**6,
           "mixed_precision": "fp16", "save_state": True, "save_every_n_steps": 1,
           "stages": [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}]}
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(build_config(raw | {"output_dir": str(out / "full")})).run()
        Trainer(build_config(raw | {"output_dir": str(out / "resumed"),
                                    "resume": str(out / "full" / "pti-state-step00000001")})).run()
    scalers = [out / run / "pti-state-step00000002" / "scaler.pt" for run in ("full", "resumed")]
    missing = [str(path) for path in scalers + [out / "full" / "pti-state-step00000001" / "scaler.pt"] if not path.is_file()]
    if missing:
        return f"no scaler.pt in {', '.join(missing)}"
    full, resumed = (torch.load(path) for path in scalers)
    return "" if full == resumed else f"resumed scaler {resumed} != uninterrupted {full}"


def build_sdxl_architecture(out: Path) -> Path:
    """SDXL 1.0's architecture with random weights (bf16 on disk), from the shipped configs; once."""
    if (out / "model_index.json").is_file():
        return out
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pti_plugin.models.single_file import CLIP_VOCAB_SIZE
    from pti_plugin.models.single_file_sdxl import SDXL_CONFIG_DIR
    from pti_plugin.models.word_vocab import BOS, EOS, filler_words, write_tokenizer_files

    words = filler_words(CLIP_VOCAB_SIZE)  # CLIP's token table, over letter-only filler words (the word vocabulary's letters)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(words, out / "tokenizer"), local_files_only=True)
    shutil.copytree(out / "tokenizer", out / "tokenizer_2")
    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids(BOS), "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
           "pad_token_id": tokenizer.convert_tokens_to_ids(EOS), "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        cls.from_config(cls.load_config(SDXL_CONFIG_DIR / sub)).to(torch.bfloat16).save_pretrained(out / sub)
    for cls, sub in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
        config = CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / sub)
        config.update(ids)
        cls(config).to(torch.bfloat16).save_pretrained(out / sub)
    shutil.copytree(SDXL_CONFIG_DIR / "scheduler", out / "scheduler")
    shutil.copy(SDXL_CONFIG_DIR / "model_index.json", out / "model_index.json")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the models and runs (default: a temporary one)")
    parser.add_argument("--sdxl_memory", action="store_true", help="also measure SDXL 1.0's architecture at 1024 px")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    from pti_plugin.models.tiny import build_tiny_sd
    from pti_plugin.models.tiny_sdxl import build_tiny_sdxl

    work = args.work or Path(tempfile.mkdtemp(prefix="pti_gpu_check_"))
    print(f"device {torch.cuda.get_device_name(0)}; work {work}")
    data = write_images(work / "data" / "2_tok1", 32)
    models = {"sd15": build_tiny_sd(work / "tiny_sd15"), "sdxl": build_tiny_sdxl(work / "tiny_sdxl")}
    stages = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
              {"kind": "lora", "steps": 2, "learning_rate": 1e-2, "train_text_encoder": True}]
    passed = total = 0
    for family, model in models.items():
        for name, options in CASES.items():
            if name == "xformers" and importlib.util.find_spec("xformers") is None:
                print(f"{family:5s} {name:22s} skipped (xformers not installed)")
                continue
            total += 1
            try:
                r = run_case(model, data, work / "runs" / f"{family}-{name}", options, stages, 32)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, the others still run
                print(f"{family:5s} {name:22s} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=3)
                continue
            passed += r["finite"]
            print(f"{family:5s} {name:22s} ok  {r['s_per_step']:.3f} s/step (loading included)  peak {r['peak_gib']:.2f} GiB  "
                  f"finite {r['finite']}")
    total += 1
    try:
        error = check_fp16_resume(models["sd15"], data, work / "runs" / "sd15-fp16_resume", 32)
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    passed += not error
    print(f"sd15  fp16_resume            {'FAILED: ' + error if error else 'ok  (the resumed scaler continues the saved one)'}")
    if args.sdxl_memory:
        total += 1
        model = build_sdxl_architecture(work / "sdxl_architecture")
        big = write_images(work / "data1024" / "2_tok1", 1024)
        options = {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer_type": "AdamW8bit",
                   "network_dim": 16, "network_alpha": 8.0}
        try:
            r = run_case(model, big, work / "runs" / "sdxl-1024", options,
                         [{"kind": "inversion", "steps": 1, "learning_rate": 3e-3}, {"kind": "lora", "steps": 4, "learning_rate": 1e-4}], 1024)
            passed += r["finite"]
            print(f"sdxl_1024 (bf16, checkpointing, AdamW8bit, rank 16, batch 1): {r['s_per_step']:.2f} s/step, "
                  f"peak {r['peak_gib']:.2f} GiB")
        except Exception as exc:  # noqa: BLE001
            print(f"sdxl_1024 FAILED: {type(exc).__name__}: {exc}")
    print(f"gpu_check: {passed}/{total} passed")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
