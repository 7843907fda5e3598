"""Seconds per step and peak memory of each training path, against plain diffusers + peft and a full-table path.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py [--quick] [--model DIR] [--repeats 3] [--steps 8] [--warmup 2]

The model: by default the SD1.5 architecture with random weights, built offline from the configs
shipped in ``pti_plugin/models/configs/sd15`` (UNet, VAE and a ViT-L-sized text encoder whose
token table has CLIP's 49408 rows, over a generated word vocabulary) and written once into
``--work``; ``--quick`` uses the toy world's shipped weights; ``--model DIR`` any diffusers folder.
Nothing is downloaded. Images: 4 generated images at ``--resolution`` (256; the toy world 32),
captions ``an anime illustration of tok1``, latents cached, fp32, SDPA, ``--optimizer`` (AdamW),
LoRA rank 16 on kohya's 192 SD1.5 UNet modules (the text encoder never trains a LoRA here).

What is timed (each one a run in its own forked process, so that its peak RSS is its own):

- ``inversion``: the trainer's inversion stage (the pivot alone trains), batch 1;
- ``full_table``: what kohya's ``train_textual_inversion.py`` and the diffusers script do: the whole
  token-embedding table trainable in the optimizer, the text encoder run every step, every row
  but the new token's restored after the step; batch 1;
- ``lora``: the trainer's LoRA stage, batch 1, started from a fixed pivot file (``weights``), with
  ``cache_text_encoder_outputs`` (the text side is frozen, so each caption is encoded once; every
  LoRA path below has it too);
- ``floor``: the same LoRA modules (same rank, alpha, optimizer, loss) with plain diffusers +
  peft: latents and the caption's conditioning computed once, then the VAE and the text encoder
  freed; one forward, backward and optimizer step per step; batch 1;
- ``lora_b4``, ``locality_b4`` (pivot locality with its defaults), ``locality_cached_b4``
  (``latents = "noise"``, ``anchor_pool = 8``, ``cache_anchors``) and ``locality_every4_b4``
  (defaults with ``every_n_steps = 4``): batch 4.

Every run does ``--warmup`` steps, then ``--steps`` measured steps (a multiple of 4, so that
``every_n_steps = 4`` is averaged over whole cycles); its s/step is the mean over the measured
steps, wall (``perf_counter``) and process CPU (``process_time``). Runs are interleaved: each of
``--repeats`` rounds runs every path once, in a rotated order. Printed per path: the median over
rounds and the spread (min-max), and the peak RSS (the high-water mark of the run's process reset
when its measured steps start, so it is the training peak; also the whole process's peak,
loading and caching included). Ratios use the medians of process CPU seconds. The last line reads
``lora_vs_floor=<f> inversion_vs_full_table=<f> locality_cached_b4=<f> locality_every4=<f>
lora_rss_vs_floor=<f>`` (locality ratios are against ``lora_b4``; ``locality_every4`` at batch 4 too),
each ratio whose two paths ran.

``--device cuda``: every path on the GPU, each run in a spawned process (CUDA cannot be used again in
a forked child), the clock waiting for the GPU at every step end; the table adds the peak CUDA memory of
the measured steps, and the ratios use wall seconds and that memory instead of CPU seconds and RSS.
"""

from __future__ import annotations

import contextlib
import gc
import io
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pti_plugin.hooks import Plugin, register_plugin  # noqa: E402
from pti_plugin.models.model_checks import model_folder_problem  # noqa: E402
from pti_plugin.models.single_file import CLIP_VOCAB_SIZE  # noqa: E402
from pti_plugin.script_args import argument_parser  # noqa: E402

CAPTION = "an anime illustration of tok1"
INIT_WORD = "character"
LORA_DIM = 16
LR = {"inversion": 5e-3, "lora": 1e-4}
LOCALITY = {
    "locality_b4": {},
    "locality_cached_b4": {"latents": "noise", "anchor_pool": 8, "cache_anchors": True},
    "locality_every4_b4": {"every_n_steps": 4},
}
PATHS = ("inversion", "full_table", "lora", "floor", "lora_b4", *LOCALITY)


def batch_of(path: str) -> int:
    """The batch a path trains at: 4 for the ``_b4`` paths, else 1."""
    return 4 if path.endswith("_b4") else 1


# ---------------------------------------------------------------------- measurement
@dataclass
class Clock:
    """Step-end times (wall, process CPU) of one run; the RSS high-water mark is reset when measuring starts."""

    warmup: int
    cuda: bool = False  # then each step end waits for the GPU, and the CUDA peak is reset with the RSS one
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, spec: dict) -> Clock:
        """The run's clock; ``spec["clock"]``, a subclass (``step_ops.py``'s op counter), builds its own."""
        if spec.get("clock", cls) is not cls:
            return spec["clock"].of(spec)
        return cls(spec["warmup"], cuda=spec["device"] == "cuda")

    def start(self) -> None:
        self.wall, self.cpu = [time.perf_counter()], [time.process_time()]

    def step_end(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.wall) == self.warmup + 1:
            reset_peak_rss()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict:
        w, c, k = self.wall, self.cpu, self.warmup
        n = len(w) - 1 - k
        cuda_peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
        return {"wall": (w[-1] - w[k]) / n, "cpu": (c[-1] - c[k]) / n, "steps": n, "train_peak_cuda_gib": cuda_peak,
                "train_peak_rss_gib": peak_rss_gib(), "process_peak_rss_gib": process_peak_rss_gib()}


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return process_peak_rss_gib()


def process_peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@register_plugin
class BenchClock(Plugin):
    """Hands the trainer's step ends to the run's :class:`Clock` and counts the UNet's LoRA modules."""

    name = "bench_clock"
    clock: Clock | None = None
    lora_modules = 0

    @dataclass
    class Options:
        pass

    def on_stage_start(self, state):
        BenchClock.lora_modules = sum(1 for m in state.model.unet.modules() if hasattr(m, "lora_A"))
        self.clock.start()

    def on_step_end(self, state, logs):
        self.clock.step_end()


# ---------------------------------------------------------------------- model and data
def build_sd15(out: Path) -> Path:
    """A diffusers folder of the SD1.5 architecture with random weights (seed 0), from the shipped configs; once."""
    if (out / "model_index.json").is_file():
        return out
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pti_plugin.models.single_file import SD15_CONFIG_DIR
    from pti_plugin.models.word_vocab import BOS, EOS, filler_words, write_tokenizer_files

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fillers = filler_words(CLIP_VOCAB_SIZE)  # CLIP's token table: 49408 rows
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(fillers, tmp / "tokenizer"), local_files_only=True)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")).save_pretrained(tmp / "unet")
    AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae")).save_pretrained(tmp / "vae")
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("bos", BOS), ("eos", EOS))}
    te_config = CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder")
    te_config.update({"vocab_size": len(tokenizer), "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                      "pad_token_id": ids["eos"]})
    CLIPTextModel(te_config).save_pretrained(tmp / "text_encoder")
    shutil.copytree(SD15_CONFIG_DIR / "scheduler", tmp / "scheduler")
    shutil.copy(SD15_CONFIG_DIR / "model_index.json", tmp / "model_index.json")
    tmp.rename(out)
    return out


def write_images(folder: Path, count: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        s = size / 32
        ImageDraw.Draw(image).ellipse([(4 + 3 * i) * s, 4 * s, (16 + 3 * i) * s, 16 * s], fill=(220, 120, 20))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(CAPTION)
    return folder.parent


def write_pivot(model: Path, path: Path) -> Path:
    """An A1111-style embedding (``emb_params``): the init word's row plus a fixed offset, the pivot every LoRA run starts from."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)
    table = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", local_files_only=True).get_input_embeddings().weight
    row = table[tokenizer.convert_tokens_to_ids(INIT_WORD + "</w>")].detach()
    offset = torch.randn(row.shape, generator=torch.Generator().manual_seed(0)) * row.norm() / row.numel() ** 0.5
    save_file({"emb_params": (row + 0.3 * offset)[None].contiguous()}, str(path))
    return path


# ---------------------------------------------------------------------- the trainer's paths
def trainer_preset(path: str, spec: dict) -> dict:
    kind = "inversion" if path == "inversion" else "lora"
    plugins = {}
    if path in LOCALITY:
        plugins["pivot_locality"] = dict(LOCALITY[path])
    plugins["bench_clock"] = {}  # last: its clock starts after the other plugins' on_stage_start
    raw = {
        "pretrained_model_name_or_path": spec["model"], "train_data_dir": spec["data"], "resolution": spec["resolution"],
        "output_dir": spec["out"], "train_batch_size": spec["batch"], "cache_latents": True,
        "log_every_n_steps": 10**6, "network_dim": LORA_DIM, "network_alpha": float(LORA_DIM), "seed": 0,
        "init_word": INIT_WORD, "optimizer_type": spec["optimizer"], "lr_scheduler": "constant",
        "stages": [{"name": kind, "kind": kind, "steps": spec["warmup"] + spec["steps"], "learning_rate": LR[kind]}],
        "plugins": plugins,
    }
    if kind == "lora":
        raw["weights"] = spec["pivot"]
        raw["cache_text_encoder_outputs"] = True  # the text side is frozen: each caption encoded once, as the floor does
    return raw


def run_trainer(path: str, spec: dict) -> dict:
    from pti_plugin.config_loading import build_config
    from pti_plugin.trainer import Trainer

    BenchClock.clock = Clock.of(spec)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        Trainer(build_config(trainer_preset(path, spec))).run()
    return BenchClock.clock.result() | {"lora_modules": BenchClock.lora_modules}


# ---------------------------------------------------------------------- plain diffusers + peft paths
def kohya_unet_targets(unet: torch.nn.Module) -> list[str]:
    """kohya's ``networks.lora`` UNet modules: attention q/k/v/out, feed-forward and proj_in/proj_out of every transformer block."""
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            names += [f"{name}.{s}" for s in ("proj_in", "proj_out")]
            for sub, _ in module.named_modules():
                if sub.endswith(("attn1", "attn2")):
                    names += [f"{name}.{sub}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
                elif sub.endswith(".ff"):
                    names += [f"{name}.{sub}.{p}" for p in ("net.0.proj", "net.2")]
    return names


def make_optimizer(name: str, params):
    if name == "AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=LR["lora"])
    return torch.optim.AdamW(params, lr=LR["lora"])


def load_components(spec: dict):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"local_files_only": True}
    model = spec["model"]
    parts = (UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw),
             AutoencoderKL.from_pretrained(model, subfolder="vae", **kw),
             CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw),
             CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw),
             DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw))
    for module in parts[:3]:
        module.requires_grad_(False).to(spec["device"])
    return parts


@torch.no_grad()
def encode_images(vae, spec: dict) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted(Path(spec["data"]).rglob("*.png"))
    size = spec["resolution"]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for f in files]).to(vae.device)
    dist = vae.encode(pixels).latent_dist
    return dist.sample(torch.Generator(vae.device).manual_seed(0)) * vae.config.scaling_factor


def diffusion_loss(unet, scheduler, latents, cond, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)  # drawn on the CPU: the same draws on every device
    noise = torch.randn(latents.shape, generator=g).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(latents.device)
    pred = unet(scheduler.add_noise(latents, noise, t), t, cond).sample
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


def run_floor(spec: dict) -> dict:
    """LoRA on kohya's UNet modules with plain diffusers + peft; the VAE and text encoder freed once used."""
    from peft import LoraConfig

    unet, vae, text_encoder, tokenizer, scheduler = load_components(spec)
    latents = encode_images(vae, spec)
    with torch.no_grad():
        ids = tokenizer([CAPTION], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        cond = text_encoder(ids.to(spec["device"]))[0]
    del vae, text_encoder
    gc.collect()
    targets = kohya_unet_targets(unet)
    unet.add_adapter(LoraConfig(r=LORA_DIM, lora_alpha=LORA_DIM, target_modules=targets, init_lora_weights="gaussian"))
    unet.to(spec["device"])
    optimizer = make_optimizer(spec["optimizer"], [p for p in unet.parameters() if p.requires_grad])
    clock, batch = Clock.of(spec), spec["batch"]
    clock.start()
    for step in range(spec["warmup"] + spec["steps"]):
        index = [(step * batch + k) % latents.shape[0] for k in range(batch)]
        loss = diffusion_loss(unet, scheduler, latents[index], cond.expand(batch, -1, -1), step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_end()
    return clock.result() | {"lora_modules": len(targets)}


def run_full_table(spec: dict) -> dict:
    """kohya's textual inversion: the whole token table in the optimizer, the text encoder run every step,
    every row but the new token's restored after each step."""
    unet, vae, text_encoder, tokenizer, scheduler = load_components(spec)
    latents = encode_images(vae, spec)
    del vae
    gc.collect()
    tokenizer.add_tokens(["tok1"])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new row is set just below
    table = text_encoder.get_input_embeddings().weight
    new_id = tokenizer.convert_tokens_to_ids("tok1")
    with torch.no_grad():
        table[new_id] = table[tokenizer.convert_tokens_to_ids(INIT_WORD + "</w>")]
    original = table.detach().clone()
    keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
    keep[new_id] = False
    table.requires_grad_(True)
    optimizer = torch.optim.AdamW([table], lr=LR["inversion"])
    ids = tokenizer([CAPTION], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(spec["device"])
    text_encoder.train()
    clock = Clock.of(spec)
    clock.start()
    for step in range(spec["warmup"] + spec["steps"]):
        cond = text_encoder(ids)[0]
        loss = diffusion_loss(unet, scheduler, latents[[step % latents.shape[0]]], cond, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            table[keep] = original[keep]
        clock.step_end()
    return clock.result() | {"table_rows": table.shape[0]}


# ---------------------------------------------------------------------- orchestration
def run_path(path: str, spec: dict) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if path == "floor":
        return run_floor(spec)
    if path == "full_table":
        return run_full_table(spec)
    return run_trainer(path, spec)


def _child(path: str, spec: dict, conn) -> None:
    try:
        conn.send(run_path(path, spec))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which names the path
        import traceback

        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def run_forked(path: str, spec: dict) -> dict:
    """Run one path in a forked process (its own peak RSS; the parent's imports reused)."""
    # CUDA cannot be used again in a forked child once the parent touched it: spawn there (slower start)
    context = multiprocessing.get_context("spawn" if spec["device"] == "cuda" else "fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(path, spec, send))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": "the process died without a result"}
    process.join()
    if "error" in result:
        raise SystemExit(f"path {path!r} failed: {result['error']}\n{result.get('traceback', '')}")
    return result


def interleaved_rounds(paths: list[str], repeats: int, run_one) -> dict[str, list[dict]]:
    """``run_one(path, round)`` for every path in each of ``repeats`` rounds, each round's order rotated by one
    (so that no path always runs first); the results per path, in round order."""
    results: dict[str, list[dict]] = {p: [] for p in paths}
    for round_index in range(repeats):
        shift = round_index % len(paths)
        for path in paths[shift:] + paths[:shift]:
            results[path].append(run_one(path, round_index))
    return results


def summary(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):8.3f} {unit} ({min(values):.3f}-{max(values):.3f})"


RATIOS = {  # name: (path, against, measure); time: process CPU seconds (on a GPU: wall); memory: the training peak
    "lora_vs_floor": ("lora", "floor", "time"), "inversion_vs_full_table": ("inversion", "full_table", "time"),
    "locality_cached_b4": ("locality_cached_b4", "lora_b4", "time"),
    "locality_every4": ("locality_every4_b4", "lora_b4", "time"), "lora_rss_vs_floor": ("lora", "floor", "memory"),
}


def report(results: dict[str, list[dict]], device: str = "cpu") -> dict[str, float]:
    """Print the table; return the ratios whose two paths both ran."""
    print(f"\n{'path':20s} {'wall s/step':>26s} {'CPU s/step':>26s} {'train peak RSS GiB':>26s} {'process peak':>13s}"
          + (f" {'train peak CUDA GiB':>26s}" if device == "cuda" else ""))
    for path, runs in results.items():
        print(f"{path:20s} {summary([r['wall'] for r in runs], 's'):>26s} {summary([r['cpu'] for r in runs], 's'):>26s} "
              f"{summary([r['train_peak_rss_gib'] for r in runs], 'G'):>26s} "
              f"{statistics.median(r['process_peak_rss_gib'] for r in runs):10.2f} G"
              + (f" {summary([r['train_peak_cuda_gib'] for r in runs], 'G'):>26s}" if device == "cuda" else ""))
    key = {"time": "wall" if device == "cuda" else "cpu",  # on a GPU the process's CPU seconds are mostly waiting
           "memory": "train_peak_cuda_gib" if device == "cuda" else "train_peak_rss_gib"}

    def med(path: str, key: str) -> float:
        return statistics.median(r[key] for r in results[path])

    if {"lora", "floor"} <= set(results):
        print(f"LoRA modules: trainer {results['lora'][0].get('lora_modules')}, floor {results['floor'][0].get('lora_modules')}")
    if "full_table" in results:
        print(f"full-table rows {results['full_table'][0]['table_rows']}")
    return {name: med(path, key[measure]) / med(against, key[measure])
            for name, (path, against, measure) in RATIOS.items() if path in results and against in results}


def parse_args(argv):
    parser = argument_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy world's shipped weights at 32 px")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: random SD1.5 architecture)")
    parser.add_argument("--resolution", type=int, default=None, help="default 256 (--quick: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (every path once per round)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run (a multiple of 4)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    parser.add_argument("--optimizer", choices=("AdamW", "AdamW8bit"), default="AdamW")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--work", type=Path, default=None, help="folder for the built model and runs (default: temporary)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: every path on the GPU, ratios from wall seconds and peak CUDA memory")
    args = parser.parse_args(argv)
    if args.steps < 4 or args.steps % 4:
        parser.error("--steps: a positive multiple of 4 (every_n_steps = 4 is averaged over whole cycles)")
    args.paths = [p for p in args.paths.split(",") if p]
    if unknown := [p for p in args.paths if p not in PATHS]:
        parser.error(f"--paths: unknown {unknown}; choose among {', '.join(PATHS)}")
    if args.model is not None and (problem := model_folder_problem(args.model)):
        parser.error(f"--model {args.model}: {problem}")
    return args


def prepare(args, work: Path) -> dict:
    from pti_plugin.toy_world import WEIGHTS_DIR

    if args.model is not None:
        model = args.model.resolve()
    elif args.quick:
        model = WEIGHTS_DIR
    else:
        started = time.perf_counter()
        model = build_sd15(work / "sd15_random")
        print(f"SD1.5 architecture, random weights: {model} ({time.perf_counter() - started:.0f} s)", flush=True)
    resolution = args.resolution or (32 if args.quick else 256)
    data = write_images(work / "data" / "1_tok1", 4, resolution)
    pivot = work / "pivot.safetensors"
    if not pivot.is_file():
        write_pivot(model, pivot)
    return {"model": str(model), "data": str(data), "resolution": resolution, "pivot": str(pivot), "warmup": args.warmup,
            "steps": args.steps, "optimizer": args.optimizer, "device": args.device}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    import logging

    logging.disable(logging.WARNING)
    import diffusers  # noqa: F401 - imported once here, reused by every forked run
    import pti_plugin.trainer  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        spec = prepare(args, work)
        print(f"model {spec['model']}, {spec['resolution']} px, {args.optimizer}, fp32, {args.device}, 1 thread, LoRA rank {LORA_DIM}; "
              f"{args.repeats} interleaved rounds, {args.warmup} warm-up + {args.steps} measured steps per run", flush=True)

        def run_one(path: str, round_index: int) -> dict:
            out = work / "runs" / f"{path}-{round_index}"
            result = run_forked(path, spec | {"batch": batch_of(path), "out": str(out)})
            print(f"  round {round_index} {path:20s} {result['cpu']:.3f} s CPU/step, {result['wall']:.3f} s wall/step, "
                  f"{result['train_peak_rss_gib']:.2f} GiB", flush=True)
            return result

        results = interleaved_rounds(args.paths, args.repeats, run_one)
    ratios = report(results, args.device)
    if ratios:
        print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    return ratios


if __name__ == "__main__":
    main()
