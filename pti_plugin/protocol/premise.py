"""The toy world's premise checks (issue 15, checks 2-4), measured with the ground-truth detectors.

The research bench means something only when, on the toy world, the character's coarse look is
within reach of the frozen generator, a light inversion gets near it without learning the
training images' positions, and the character's private detail needs the LoRA. Each check is
measured on generations of held-out neutral prompts (:data:`~pti_plugin.toy_world.world.NEUTRAL_TEMPLATES`, the
subject in place of ``{}``; seed ``k`` uses template ``k mod 4``):

- **null**: the base model prompted with the init word; its training-cell fraction (objects in one
  of :data:`~pti_plugin.toy_world.world.CHARACTER_CELLS`) with a bootstrap 95% interval, the band an inversion's
  fraction must stay in (about 1/3 for a model that places objects at random);
- **oracle** (check 2): the UNet's whole conditioning (77 x d) optimised directly on the
  character images by the denoising loss (no text encoder, no LoRA), then sampled with; its
  coarse reconstruction rate says whether the look is reachable at all;
- **inversion** (check 3): 1-vector inversions with the project's trainer at a few learning
  rates; the check picks the learning rate whose coarse rate lies in [0.5, 0.9] with a
  training-cell fraction inside the null interval (the best coarse rate among those; without one,
  the best coarse rate overall);
- **lora** (check 4): a LoRA stage from the picked pivot at a few learning rates; the detail rate
  (:func:`~pti_plugin.toy_world.detectors.has_detail`) must stay low after every inversion and appear after the LoRA.

Every part is written as JSON under ``<out>/parts/`` with the settings it was measured with and is
reused when they match (resumable: an interrupted check redoes only the unfinished part); training
runs live in ``<out>/runs/<name>-<digest of the preset>``, and one stopped by a signal stops the script
(:func:`stop_script`, :func:`stops_cleanly`) and is continued from its saved state by the next
(:func:`train_run`, :func:`resumable_state`). :func:`run_premise` returns the summary, also written to
``<out>/premise.json`` with each check's verdict (:func:`premise_checks`); :func:`premise_line` formats both.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from ..atomic_io import atomic_write_text
from ..metrics.run_model import file_digest
from ..settings_cache import read_cache
from ..stop_signals import STOP_SIGNALS, StopSignalled, stop_raises
from ..toy_world.detectors import appearance_error, detect_character, has_detail
from ..toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS
from ..toy_world.world import CHARACTER_CELLS, NEUTRAL_TEMPLATES, bench_dataset

#: Check 2's least coarse rate of the conditioning oracle (the character's look is reachable).
ORACLE_COARSE_MIN = 0.8
#: Check 3's band for the inversion's coarse reconstruction rate.
INVERSION_COARSE_BAND = (0.5, 0.9)
#: Check 4: the largest detail rate any inversion may have, and the least some LoRA must reach.
DETAIL_AFTER_INVERSION_MAX = 0.05
DETAIL_AFTER_LORA_MIN = 0.5
LINE_KEYS = ("oracle_coarse", "inversion_coarse", "inversion_training_cells", "null_cells_lo", "null_cells_hi",
             "detail_after_inversion", "detail_after_lora")


@dataclass(frozen=True)
class PremiseSettings:
    """What the checks train and how they sample (``seeds`` generations per model, DDIM ``sample_steps``)."""

    # the look name of the character's nearest named neighbour (an orange-over-blue square); inversions
    # from it turn the square into the disc between lr 2e-5 and 3e-5 (world v2, run d)
    init_word: str = "rono"
    inversion_lrs: tuple[float, ...] = (1e-5, 2e-5, 2.5e-5, 2.75e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    inversion_steps: int = 1000
    lora_lrs: tuple[float, ...] = (3e-3,)
    lora_steps: int = 1000
    oracle_steps: int = 1000
    oracle_lr: float = 1e-2
    seeds: int = 64
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE
    bootstrap: int = 2000

    @classmethod
    def quick(cls) -> PremiseSettings:
        """A few steps and seeds everywhere: exercises every part in about a minute (tests)."""
        return cls(inversion_lrs=(1e-2,), inversion_steps=3, lora_lrs=(1e-3,), lora_steps=3, oracle_steps=3,
                   seeds=4, sample_steps=2, bootstrap=200)

    def sampling(self) -> dict:
        return {"seeds": self.seeds, "sample_steps": self.sample_steps, "guidance": self.guidance}


# ---------------------------------------------------------------------------------------------
# measurement of generations


def neutral_prompts(subject: str, seeds: int) -> list[str]:
    """The neutral prompt of each seed ``0..seeds-1`` (template ``k mod 4``) with ``subject`` in place."""
    return [NEUTRAL_TEMPLATES[k % len(NEUTRAL_TEMPLATES)].format(subject) for k in range(seeds)]


@torch.no_grad()
def sample(pipe, cond: torch.Tensor, uncond: torch.Tensor, settings: PremiseSettings, first_seed: int = 0) -> np.ndarray:
    """Generate with conditioning ``cond [n, L, d]`` (seed ``first_seed + k`` for row ``k``) -> uint8 ``(n, 32, 32, 3)``."""
    out = []
    for start in range(0, len(cond), 32):
        part = cond[start : start + 32]
        images = pipe(
            prompt_embeds=part, negative_prompt_embeds=uncond.expand(len(part), -1, -1),
            num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance, output_type="np",
            generator=[torch.Generator().manual_seed(first_seed + start + k) for k in range(len(part))],
        ).images
        out.append((np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def bootstrap_interval(hits: list[bool], draws: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``hits`` (NaNs when empty)."""
    if not hits:
        return float("nan"), float("nan")
    values = np.asarray(hits, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(draws, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def measure(images: np.ndarray, bootstrap: int = 0) -> dict:
    """Ground-truth figures of generations: ``coarse`` (the character's coarse look), ``detail`` (its
    dot), ``appearance_error`` (mean graded error), ``training_cells`` (objects in a character cell,
    over images with an object) and its bootstrap interval when ``bootstrap`` draws are asked."""
    found = [detect_character(img) for img in images]
    cells = [(d.object.row, d.object.col) in CHARACTER_CELLS for d in found if d.object.row is not None]
    figures = {
        "images": len(images),
        "objects": len(cells),
        "coarse": float(np.mean([d.is_character for d in found])),
        "detail": float(np.mean([has_detail(img, d.object) for img, d in zip(images, found)])),
        "appearance_error": float(np.mean([appearance_error(img, d.object) for img, d in zip(images, found)])),
        "training_cells": float(np.mean(cells)) if cells else float("nan"),
    }
    if bootstrap:
        figures["training_cells_lo"], figures["training_cells_hi"] = bootstrap_interval(cells, bootstrap)
    return figures


# ---------------------------------------------------------------------------------------------
# parts, cached as JSON


class Parts:
    """``<out>/parts/<name>.json``: reused when its recorded settings equal the asked ones.

    A part's generations (the ``images`` its computation returns beside its figures) are kept as
    ``<name>.npz`` (uint8 ``images``, for re-scoring) and ``<name>.png`` (a grid, for looking)."""

    def __init__(self, out: Path, log: Callable[[str], None], part: str = "premise"):
        self.folder = out / "parts"
        self.log = log
        self.part = part  # what the log lines name: the premise check, h1, h3

    def cached(self, name: str, settings: dict) -> dict | None:
        """The part ``name`` when it was measured under ``settings``, else None."""
        return read_cache(self.folder / f"{name}.json", settings, None)

    def get(self, name: str, settings: dict, compute: Callable[[], dict]) -> dict:
        path = self.folder / f"{name}.json"
        cached = self.cached(name, settings)
        if cached is not None:
            self.log(f"{self.part}: {name} cached")
            return cached
        self.log(f"{self.part}: measuring {name}")
        started = time.time()
        figures = compute()
        result = {"settings": settings, **figures, "seconds": round(time.time() - started, 1)}
        images = result.pop("images_generated", None)
        self.folder.mkdir(parents=True, exist_ok=True)
        if images is not None:
            from PIL import Image

            from ..toy_world.train_recipe import image_grid

            np.savez_compressed(self.folder / f"{name}.npz", images=images)
            Image.fromarray(image_grid(images, columns=16)).save(self.folder / f"{name}.png")
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        return result


def model_digest(model: Path) -> str:
    """Digest of the model's UNet and text-encoder weights (a re-exported snapshot gets new results)."""
    files = sorted(p for sub in ("unet", "text_encoder") for p in (model / sub).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model} is not a diffusers folder with unet/ and text_encoder/ safetensors")
    return hashlib.sha256("".join(file_digest(p) for p in files).encode()).hexdigest()[:12]


def load_base(model: Path):
    """The base model (:func:`~pti_plugin.models.loading.load_base_model`) and a pipeline around it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..models.loading import load_base_model

    base = load_base_model(str(model))
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config, prediction_type=base.prediction_type)
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return base, pipe


@torch.no_grad()
def encode_text(base, prompts: list[str]) -> torch.Tensor:
    """The UNet's per-token conditioning ``[B, 77, d]`` of ``prompts`` (through the family adapter)."""
    return base.encode(base.tokenize(prompts)).hidden_states


def measure_null(model: Path, settings: PremiseSettings) -> dict:
    """The base model on the init word's neutral prompts."""
    base, pipe = load_base(model)
    cond = encode_text(base, neutral_prompts(settings.init_word, settings.seeds))
    images = sample(pipe, cond, encode_text(base, [""]), settings)
    return measure(images, settings.bootstrap) | {"images_generated": images}


# ---------------------------------------------------------------------------------------------
# check 2: the conditioning oracle


def character_latents(base, data_dir: Path) -> torch.Tensor:
    """VAE posterior means (scaled) ``[n, 4, 16, 16]`` of the character images under ``data_dir``."""
    from PIL import Image

    paths = sorted(data_dir.glob("*/*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)) for p in paths])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        return base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor


def denoising_loss(base, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The training objective (uniform timesteps, the model's prediction type) of one conditioning ``[1, L, d]``."""
    from ..diffusion_loss import training_target

    scheduler = base.noise_scheduler
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    prediction = base.unet(noisy, t, encoder_hidden_states=cond.expand(len(latents), -1, -1)).sample
    target = training_target(scheduler, latents, noise, t, base.prediction_type)
    return torch.nn.functional.mse_loss(prediction, target)


def held_out_loss(base, latents: torch.Tensor, cond: torch.Tensor, draws: int = 16) -> float:
    """The denoising loss averaged over ``draws`` fixed noise/timestep draws (comparable across conditionings)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return float(np.mean([float(denoising_loss(base, latents, cond, generator)) for _ in range(draws)]))


def measure_oracle(model: Path, data_dir: Path, settings: PremiseSettings) -> dict:
    """Optimise the whole conditioning on the character images, then sample with it."""
    base, pipe = load_base(model)
    latents = character_latents(base, data_dir)
    start = encode_text(base, [f"a {settings.init_word}"])
    cond = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([cond], lr=settings.oracle_lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(settings.oracle_steps):
        optimizer.zero_grad()
        denoising_loss(base, latents, cond, generator).backward()
        optimizer.step()
    cond = cond.detach()
    images = sample(pipe, cond.expand(settings.seeds, -1, -1), encode_text(base, [""]), settings)
    figures = measure(images) | {"images_generated": images}
    with torch.no_grad():  # the VAE's round trip of the character images: the ceiling of any generation
        decoded = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    round_trip = ((decoded.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    figures["vae_round_trip"] = measure(round_trip)
    return figures | {"loss_init": held_out_loss(base, latents, start), "loss_optimised": held_out_loss(base, latents, cond),
                      "images_trained_on": len(latents)}


# ---------------------------------------------------------------------------------------------
# checks 3 and 4: runs of the project's trainer


def run_preset(base_preset: dict, model: Path, data_dir: Path, init_word: str, stage: dict, weights: Path | None) -> dict:
    """The trainer preset of one run: ``base_preset`` with the model, the character set, the init word and
    the single ``stage``; plugins off; ``weights`` (a pivot file) starts the pivot instead of the init word."""
    preset = copy.deepcopy(base_preset)
    preset |= {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data_dir), "init_word": init_word,
               "num_vectors_per_token": 1, "stages": [stage], "plugins": {}, "output_name": "premise",
               "token_string": "tok1", "sample_prompts": "", "sample_at_first": False}
    for key in ("max_train_epochs", "weights"):
        preset.pop(key, None)
    if weights is not None:
        preset["weights"] = str(weights)
    return preset


def resumable_state(run_dir: Path, preset_file: Path, preset: dict) -> tuple[Path | None, str]:
    """The saved state that continues the unfinished run of ``preset`` in ``run_dir`` (its preset file
    ``preset_file``, written when it started) and a note; or None and why the run starts over. Only a run of the same
    preset is continued (the file holds ``preset`` with this ``output_dir``), from a complete state folder of its
    ``output_name`` (a ``--save_every`` save's, or the ``-interrupted-`` one a stopped run saves), the latest by
    :func:`~pti_plugin.outputs.latest_state_of_config`'s rule."""
    import toml

    from ..outputs import latest_state_of_config, state_folders
    from ..resume import STATE_FILES

    name = preset["output_name"]
    states = [(step, path) for step, path in state_folders(run_dir)
              if path.name.rpartition("-state-")[0] == name and all((path / f).is_file() for f in STATE_FILES)]
    if not states:
        return None, "no saved state to continue from (it stopped before its first save)"
    asked = toml.loads(toml.dumps(preset | {"output_dir": str(run_dir)}))
    try:
        same = toml.loads(preset_file.read_text(encoding="utf-8")) == asked
    except (OSError, UnicodeDecodeError, toml.TomlDecodeError):
        same = False
    if not same:
        return None, f"its saved states belong to another preset than this run's ({preset_file} differs or is missing)"
    return latest_state_of_config(states, run_dir / f"{name}.config.toml")


def stop_script(signum: int, what: str = "") -> NoReturn:
    """End the script after a stop signal (SIGINT, SIGTERM): one line, exit status 128 + ``signum``, no traceback
    (every part and run it finished is kept; a stopped training run saved its state and is continued)."""
    print(f"{what}stopped by {signal.Signals(signum).name}; run the same command again to continue", flush=True)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def stops_cleanly() -> Iterator[None]:
    """While the block runs (a script's work), SIGINT or SIGTERM outside a training run (measuring, generating)
    stops it at once with :func:`stop_script`'s line; a run's own handler saves its state first."""
    try:
        with stop_raises():
            yield
    except StopSignalled as stop:
        stop_script(stop.signum)
    except KeyboardInterrupt:  # a second Ctrl-C that a run's handler turned into one
        stop_script(signal.SIGINT)


def train_run(preset: dict, run_dir: Path, log: Callable[[str], None], part: str = "premise") -> Path:
    """Train ``preset`` into ``run_dir`` with :func:`pti_plugin.cli.main` unless finished there; returns ``run_dir``.
    An unfinished run is continued from its latest saved state (:func:`resumable_state`), else started over; a run
    stopped by a signal (it saved its state) stops the script (:func:`stop_script`). ``part`` names it in the log."""
    import toml

    from ..cli import main as train_main
    from ..outputs import script_continues_runs
    from ..run_lock import RunLock

    if (run_dir / "premise.safetensors").is_file():
        return run_dir
    path = run_dir.parent / f"{run_dir.name}.toml"  # not with_suffix: a name like "lr2.5e-05-..." holds a dot
    state = None
    if run_dir.is_dir():  # unfinished: refused (naming the process) while another process trains it
        with RunLock(run_dir, preset["output_name"]):
            pass
        state, note = resumable_state(run_dir, path, preset)
        if state is None:
            log(f"{part}: starting {run_dir.name} over: {note}")
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            log(f"{part}: continuing {run_dir.name} from {state.name}" + (f" ({note})" if note else ""))
    if state is None:
        run_dir.mkdir(parents=True)
        atomic_write_text(path, toml.dumps(preset | {"output_dir": str(run_dir)}))
        log(f"{part}: training {run_dir.name}")
    resume = [] if state is None else ["--resume", str(state)]
    with script_continues_runs():  # a stopped run's message: its saved state, and this script's line below
        code = train_main(["--preset", str(path), *resume])  # from fresh accelerate state (Trainer._setup)
    if (signum := code - 128) in STOP_SIGNALS:
        stop_script(signum, f"{part}: {run_dir.name} ")
    if code != 0 or not (run_dir / "premise.safetensors").is_file():
        raise RuntimeError(f"premise run {run_dir.name} failed (exit code {code}); its preset is {path}")
    return run_dir


def measure_run(run_dir: Path, settings: PremiseSettings) -> dict:
    """The fine-tuned model of a run (pivot, LoRA on) on the neutral prompts."""
    from ..metrics.run_model import load_run

    run = load_run(run_dir, device="cpu")
    with run.lora(True):
        cond = run.encode(neutral_prompts(run.pivot_text, settings.seeds))
        uncond = run.encode([""])
        images = sample(run.pipe, cond, uncond, settings)
    return measure(images) | {"images_generated": images}


def preset_digest(preset: dict) -> str:
    return hashlib.sha256(json.dumps(preset, sort_keys=True).encode()).hexdigest()[:10]


def inversion_qualifies(coarse: float, training_cells: float, null_lo: float, null_hi: float) -> bool:
    """Check 3's rule for one inversion: coarse rate in :data:`INVERSION_COARSE_BAND`, training-cell fraction in the
    null interval."""
    low, high = INVERSION_COARSE_BAND
    return low <= coarse <= high and null_lo <= training_cells <= null_hi


def pick_inversion(inversions: list[dict], null_lo: float, null_hi: float) -> dict:
    """Check 3's learning rate: coarse rate in the band with the training-cell fraction in the null
    interval, the best coarse rate among those; when none qualifies, the best coarse rate overall."""
    qualified = [r for r in inversions if inversion_qualifies(r["coarse"], r["training_cells"], null_lo, null_hi)]
    return max(qualified or inversions, key=lambda r: r["coarse"]) | {"passes": bool(qualified)}


def premise_checks(summary: dict) -> dict[str, str]:
    """Checks 2-4's verdicts (``"pass"`` or ``"fail"``) on a summary (:func:`run_premise`'s): the oracle's coarse rate at least
    :data:`ORACLE_COARSE_MIN`; the picked inversion qualifying (:func:`inversion_qualifies`, the picked one qualifies
    when any does); the detail rate at most :data:`DETAIL_AFTER_INVERSION_MAX` after every inversion and at least
    :data:`DETAIL_AFTER_LORA_MIN` after some LoRA."""
    passes = {
        "check2": summary["oracle_coarse"] >= ORACLE_COARSE_MIN,
        "check3": inversion_qualifies(summary["inversion_coarse"], summary["inversion_training_cells"],
                                      summary["null_cells_lo"], summary["null_cells_hi"]),
        "check4": (summary["detail_after_inversion"] <= DETAIL_AFTER_INVERSION_MAX
                   and summary["detail_after_lora"] >= DETAIL_AFTER_LORA_MIN),
    }
    return {name: "pass" if ok else "fail" for name, ok in passes.items()}


# ---------------------------------------------------------------------------------------------
# the whole check


def check_init_word(model: Path, word: str) -> None:
    """Refuse an init word that the model's tokenizer does not hold as one known token (ValueError)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"init word {word!r} is not one token of {model}'s tokenizer")


def run_premise(model: Path, out: Path, base_preset: dict, settings: PremiseSettings = PremiseSettings(),
                log: Callable[[str], None] = lambda text: print(text, flush=True)) -> dict:
    """Run checks 2-4 on the diffusers folder ``model`` (resumable under ``out``); returns the summary."""
    model, out = Path(model).resolve(), Path(out).resolve()
    check_init_word(model, settings.init_word)
    data_dir = bench_dataset(out)
    parts = Parts(out, log, "premise")
    common = {"model_digest": model_digest(model), "init_word": settings.init_word} | settings.sampling()
    null = parts.get("null", common | {"bootstrap": settings.bootstrap}, lambda: measure_null(model, settings))
    oracle = parts.get("oracle", common | {"steps": settings.oracle_steps, "lr": settings.oracle_lr},
                       lambda: measure_oracle(model, data_dir, settings))

    def stage_part(kind: str, lr: float, steps: int, weights: Path | None) -> dict:
        stage = {"name": kind, "kind": kind, "steps": steps, "learning_rate": lr} | ({"unet_lr": lr} if kind == "lora" else {})
        preset = run_preset(base_preset, model, data_dir, settings.init_word, stage, weights)
        run_dir = out / "runs" / f"{kind}-lr{lr:g}-{preset_digest(preset | {'model_digest': common['model_digest']})}"
        figures = parts.get(run_dir.name, common | {"preset": preset},
                            lambda: measure_run(train_run(preset, run_dir, log), settings))
        return figures | {"lr": lr, "run_dir": str(run_dir)}

    inversions = [stage_part("inversion", lr, settings.inversion_steps, None) for lr in settings.inversion_lrs]
    picked = pick_inversion(inversions, null["training_cells_lo"], null["training_cells_hi"])
    pivot = Path(picked["run_dir"]) / "tok1.safetensors"
    loras = [stage_part("lora", lr, settings.lora_steps, pivot) for lr in settings.lora_lrs]
    summary = {
        "oracle_coarse": oracle["coarse"],
        "inversion_coarse": picked["coarse"],
        "inversion_training_cells": picked["training_cells"],
        "null_cells_lo": null["training_cells_lo"],
        "null_cells_hi": null["training_cells_hi"],
        "detail_after_inversion": max(r["detail"] for r in inversions),
        "detail_after_lora": max(r["detail"] for r in loras),
    }
    result = {
        "model": str(model), "settings": dataclasses.asdict(settings), "summary": summary,
        "picked_inversion_lr": picked["lr"], "inversion_check_passes": picked["passes"],
        "null": null, "oracle": oracle, "inversions": inversions, "loras": loras,
        "checks": premise_checks(summary),
        "notes": {
            "oracle_coarse": f"the conditioning oracle's coarse rate (check 2: >= {ORACLE_COARSE_MIN:g})",
            "detail_after_inversion": "the largest detail rate over the inversions (check 4: <= "
                                      f"{DETAIL_AFTER_INVERSION_MAX:g} for every one)",
            "detail_after_lora": "the largest detail rate over the LoRA learning rates (check 4: >= "
                                 f"{DETAIL_AFTER_LORA_MIN:g} for some)",
            "inversion_*": "at the picked learning rate (check 3: coarse in [{:g}, {:g}], cells in the null "
                           "interval)".format(*INVERSION_COARSE_BAND),
            "checks": "each check's verdict by these thresholds (premise_checks)",
        },
    }
    atomic_write_text(out / "premise.json", json.dumps(result, indent=2) + "\n")
    return result


def premise_line(summary: dict) -> str:
    """``oracle_coarse=<f> ... detail_after_lora=<f>`` (3 decimals), then ``check2=pass|fail check3=... check4=...``
    (:func:`premise_checks`, the verdicts ``premise.json`` records)."""
    figures = [f"{key}={summary[key]:.3f}" for key in LINE_KEYS]
    return " ".join(figures + [f"{name}={verdict}" for name, verdict in premise_checks(summary).items()])
