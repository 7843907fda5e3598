"""Train the toy-world text-to-image model from scratch and export it as an SD1.5-style folder.

Usage::

    python -m pti_plugin.toy_world.train_recipe --out DIR [--minutes M] [--steps N] [--resume]
    python -m pti_plugin.toy_world.train_recipe --out DIR --export-only

Stages (all deterministic under ``--seed`` for a fixed thread count):

1. **VAE**: a small ``AutoencoderKL`` with one downsampling step (``(3, 32, 32)`` images ->
   ``(4, 16, 16)`` latents) is trained briefly on world scenes mixed with random "patchwork"
   images (random colours, two-coloured shapes), so that it also encodes appearances the world
   never shows (the PTI character). It is then frozen; ``scaling_factor`` = 1 / latent std.
   Saved atomically to ``DIR/vae.pt``; the encoded scene set to ``DIR/latents.pt`` (``recipe_vae.py``).
2. **Diffusion**: a ``UNet2DConditionModel`` with SD1.5's block types (3 cross-attention down
   blocks + 1 plain, mirrored up) at small widths and one layer per block, and a small
   ``CLIPTextModel`` (ending in its final LayerNorm), trained jointly with v-prediction on a
   cosine schedule rescaled to zero terminal SNR, AdamW, EMA, caption dropout, and an optional
   timestep curriculum that, from a given step, draws part of each batch at high noise (where
   the layout is decided: without it the model ignored position words). The EMA weights,
   the live weights, the optimizer and all RNG states are checkpointed atomically to
   ``DIR/checkpoint.pt`` every ``checkpoint_minutes``; ``--resume`` continues exactly from it.
   Every ``eval_minutes`` a quick detector-based quality estimate is logged.
3. **Export**: the EMA model as a diffusers folder ``DIR/model`` (``model_index.json``,
   ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``; safetensors, UNet stored fp16) plus
   ``recipe.json`` (seed, settings, steps, duration).

The recipe keeps its own warm-up and EMA rules rather than diffusers' ``get_scheduler`` and ``EMAModel``:
``get_scheduler``'s warm-up is one step behind (``step / warmup`` against ``(step + 1) / warmup``) and
``EMAModel`` starts its decay one step later with other state keys, so switching would change every
trained model and break the resume of existing checkpoints.

``DIR/recipe.json`` holds the settings (``recipe_config.py``); a resumed run reads them from there. SIGTERM/SIGINT stop
the run after the current step with a checkpoint (continue with ``--resume``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pti_plugin.models.word_vocab import BASE_WORDS, build_vocab, write_tokenizer_files
from pti_plugin.script_args import argument_parser

from .detectors import score_generations
from .recipe_config import GUIDANCE, SAMPLE_STEPS, RecipeConfig, atomic_save, log
from .recipe_vae import load_or_train_vae
from .world import IMAGE_SIZE, LOOK_NAMES, WORDS, make_caption, quality_prompts, two_tone_prompts


# ---------------------------------------------------------------------------------------------
# model construction


def build_tokenizer(out_dir: Path) -> CLIPTokenizer:
    """Write the toy vocabulary (every world word = one token) to ``out_dir`` and load it."""
    write_tokenizer_files(WORDS, out_dir)
    return CLIPTokenizer.from_pretrained(str(out_dir))


def build_text_encoder(cfg: RecipeConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small CLIP text encoder (77 positions, final LayerNorm) matching ``tokenizer``'s ids."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=77,
        projection_dim=cfg.text_hidden,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(cfg: RecipeConfig) -> UNet2DConditionModel:
    """SD1.5's UNet block types at small widths, on ``(4, 16, 16)`` latents."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        attention_head_dim=tuple(cfg.unet_heads),  # diffusers' legacy name: number of heads
        cross_attention_dim=cfg.text_hidden,
        norm_num_groups=16,
    )


def build_pipeline(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, cfg: RecipeConfig
) -> StableDiffusionPipeline:
    """A standard ``StableDiffusionPipeline`` (DDIM sampler, no safety checker) around the modules."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**cfg.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------
# sampling and evaluation


def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], *, guidance_scale: float = GUIDANCE,
             num_inference_steps: int = SAMPLE_STEPS, batch_size: int = 36) -> np.ndarray:
    """Generate one image per prompt (fixed seed each) -> uint8 ``(N, 32, 32, 3)``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        result = pipe(
            prompts[i : i + batch_size],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]],
            output_type="np",
        )
        out.append(np.clip(np.rint(result.images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def image_grid(images: np.ndarray, columns: int = 12, scale: int = 2) -> np.ndarray:
    """Tile uint8 ``(N, 32, 32, 3)`` images into one uint8 image (1-px gray gutters), upscaled."""
    n = len(images)
    rows = (n + columns - 1) // columns
    cell = IMAGE_SIZE + 1
    grid = np.full((rows * cell + 1, columns * cell + 1, 3), 90, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        grid[1 + r * cell : 1 + r * cell + IMAGE_SIZE, 1 + c * cell : 1 + c * cell + IMAGE_SIZE] = img
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


# ---------------------------------------------------------------------------------------------
# diffusion training


def active_phase(phases: list, step: int) -> list | None:
    """The curriculum phase in force at ``step``: the one with the latest ``from_step`` (its first entry)
    not after ``step``, or None."""
    started = [p for p in phases if step >= p[0]]
    return max(started, key=lambda p: p[0]) if started else None


class Trainer:
    """Holds the diffusion stage's state; :meth:`state_dict` / :meth:`load_state_dict` cover all of it."""

    def __init__(self, cfg: RecipeConfig, out: Path):
        self.cfg, self.out = cfg, out
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(out / "tokenizer")
        self.text_encoder = build_text_encoder(cfg, self.tokenizer)
        self.unet = build_unet(cfg)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False).eval()
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.noise_scheduler = DDPMScheduler(**cfg.scheduler)
        self.rng = np.random.default_rng([cfg.seed, 2])
        self.step = 0
        self.train_seconds = 0.0
        self._token_cache: dict[str, torch.Tensor] = {}
        self._two_tone_indices: np.ndarray | None = None  # scene indices drawn by two_tone_phases

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.rng.bit_generator.state,
            "vocab": self.tokenizer.get_vocab(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        # a checkpoint from before the look names holds world v2's first vocabulary
        saved_vocab = state.get("vocab") or build_vocab(BASE_WORDS + tuple(w for w in WORDS if w not in LOOK_NAMES.values()))[0]
        if saved_vocab != self.tokenizer.get_vocab():
            state = self._grown_vocabulary(state, saved_vocab)
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.ema_unet.load_state_dict(state["ema_unet"])
        self.ema_text.load_state_dict(state["ema_text"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.rng.bit_generator.state = state["numpy_rng"]

    def _grown_vocabulary(self, state: dict, saved_vocab: dict[str, int]) -> dict:
        """``state`` with its token-embedding rows (live, EMA, AdamW moments) moved to this tokenizer's
        ids, matched by token string; new tokens keep this trainer's fresh rows and zero moments."""
        vocab = self.tokenizer.get_vocab()  # BPE merge pieces of the old vocabulary may be gone: no caption uses them
        old_ids = torch.tensor([saved_vocab[t] for t in vocab if t in saved_vocab])
        new_ids = torch.tensor([vocab[t] for t in vocab if t in saved_vocab])
        names = [n for n, _ in self.text_encoder.named_parameters()]
        key = next(n for n in names if n.endswith("token_embedding.weight"))
        state = dict(state, text_encoder=dict(state["text_encoder"]), ema_text=dict(state["ema_text"]))
        for part in ("text_encoder", "ema_text"):
            rows = self.text_encoder.state_dict()[key].clone()  # (len(vocab), text_hidden)
            rows[new_ids] = state[part][key][old_ids]
            state[part][key] = rows
        optimizer = copy.deepcopy(state["optimizer"])
        moments = optimizer["state"].get(len(list(self.unet.parameters())) + names.index(key), {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in moments:
                grown = torch.zeros(len(vocab), moments[name].shape[1], dtype=moments[name].dtype)
                grown[new_ids] = moments[name][old_ids]
                moments[name] = grown
        log(f"vocabulary changed from {len(saved_vocab)} to {len(vocab)} tokens: {len(old_ids)} rows moved by token")
        return dict(state, optimizer=optimizer)

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """int64 ``(B, 77)`` ids, padded/truncated exactly as the SD pipeline does."""
        for c in captions:
            if c not in self._token_cache:
                self._token_cache[c] = self.tokenizer(
                    c, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                ).input_ids[0]
        return torch.stack([self._token_cache[c] for c in captions])

    def train_step(self, latents_mean: torch.Tensor, latents_std: torch.Tensor, scenes: list, scaling: float) -> float:
        """One optimisation step on a random batch; returns the loss."""
        cfg = self.cfg
        idx = self.rng.integers(len(scenes), size=cfg.batch_size)
        tone_phase = active_phase(cfg.two_tone_phases, self.step)
        if tone_phase is not None:
            _, fraction = tone_phase
            if self._two_tone_indices is None:
                self._two_tone_indices = np.array([i for i, s in enumerate(scenes) if s.colour2 is not None])
            redraw = self.rng.random(cfg.batch_size) < fraction
            idx[redraw] = self.rng.choice(self._two_tone_indices, size=int(redraw.sum()))
        name_phase = active_phase(cfg.name_caption_phases, self.step)
        probs = {"name_look": name_phase[1]} if name_phase is not None else None
        captions = [
            "" if self.rng.random() < cfg.caption_dropout else make_caption(scenes[i], self.rng, probs) for i in idx
        ]
        index = torch.from_numpy(idx)
        latents = (latents_mean[index] + latents_std[index] * torch.randn(cfg.batch_size, 4, 16, 16)) * scaling
        noise = torch.randn_like(latents)
        num_t = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, num_t, (cfg.batch_size,))
        noise_phase = active_phase(cfg.high_noise_phases, self.step)
        if noise_phase is not None:
            _, fraction, min_t = noise_phase
            high = torch.rand(cfg.batch_size) < fraction
            t = torch.where(high, torch.randint(int(min_t), num_t, (cfg.batch_size,)), t)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = self.noise_scheduler.get_velocity(latents, noise, t)
        hidden = self.text_encoder(self.token_ids(captions))[0]  # (B, 77, text_hidden)
        pred = self.unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred, target)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()), cfg.grad_clip
        )
        self.optimizer.step()
        self.step += 1
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for live, ema in ((self.unet, self.ema_unet), (self.text_encoder, self.ema_text)):
                for p, e in zip(live.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)
        return float(loss.detach())


def evaluate(pipe: StableDiffusionPipeline, cfg: RecipeConfig, n: int, seed: int = 1234) -> tuple[dict, np.ndarray]:
    """Detector-based quality of ``pipe`` on ``n`` fixed prompts/seeds -> (figures, images)."""
    prompts, seeds = quality_prompts(n, seed)
    two_tone, two_tone_seeds = two_tone_prompts(max(n // 3, 2), seed)
    prompts, seeds = prompts + two_tone, seeds + two_tone_seeds
    images = generate(pipe, prompts, seeds, guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps)
    return score_generations(prompts, images), images


def reproduce_command(cfg: RecipeConfig, steps: int) -> str:
    """The command line that retrains this model (settings differing from the defaults via --set)."""
    defaults = dataclasses.asdict(RecipeConfig())
    changed = [
        f"{k}={json.dumps(v, separators=(',', ':'))}"
        for k, v in dataclasses.asdict(cfg).items()
        if k != "seed" and json.dumps(v) != json.dumps(defaults[k])
    ]
    sets = " --set " + " ".join(f"'{c}'" for c in changed) if changed else ""
    return f"OMP_NUM_THREADS=1 python -m pti_plugin.toy_world.train_recipe --out DIR --seed {cfg.seed} --steps {steps}{sets}"


def export(trainer: Trainer, vae: AutoencoderKL, cfg: RecipeConfig, dest: Path) -> None:
    """Write the EMA model as a diffusers folder + ``recipe.json`` to ``dest``.

    The UNet is stored in fp16 (diffusers upcasts it to fp32 on load); the small VAE and text
    encoder stay fp32 (transformers would otherwise load the text encoder in fp16).
    """
    pipe = build_pipeline(copy.deepcopy(trainer.ema_unet).half(), vae, trainer.ema_text, trainer.tokenizer, cfg)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    record = {
        "command": reproduce_command(cfg, trainer.step),
        "settings": dataclasses.asdict(cfg),
        "steps": trainer.step,
        "train_minutes": round(trainer.train_seconds / 60, 1),
        "images_seen": trainer.step * cfg.batch_size,
        "storage_dtype": "unet float16 (loads as float32), vae and text_encoder float32",
    }
    (tmp / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    log(f"exported step {trainer.step} to {dest}")


def run(out: Path, cfg: RecipeConfig, minutes: float | None, max_steps: int | None, resume: bool, export_only: bool) -> None:
    """Run the recipe in ``out``: stages 1-3, training until ``minutes`` or ``max_steps`` (None: no limit)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    vae, lat_mean, lat_std, scenes = load_or_train_vae(cfg, out)
    scaling = float(vae.config.scaling_factor)
    trainer = Trainer(cfg, out)
    ckpt = out / "checkpoint.pt"
    if (resume or export_only) and ckpt.exists():
        trainer.load_state_dict(torch.load(ckpt, weights_only=False))
        log(f"resumed at step {trainer.step} ({trainer.train_seconds / 60:.1f} training minutes)")
    if not export_only:
        pipe = build_pipeline(trainer.ema_unet, vae, trainer.ema_text, trainer.tokenizer, cfg)
        pipe.set_progress_bar_config(disable=True)
        last_ckpt = last_eval = time.time()
        window_start, window_steps, losses = time.time(), 0, []
        stop = []  # SIGTERM/SIGINT end the run after the current step, with a checkpoint
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.append(signum))
        while (
            not stop
            and (minutes is None or trainer.train_seconds < minutes * 60)
            and (max_steps is None or trainer.step < max_steps)
        ):
            t0 = time.time()
            losses.append(trainer.train_step(lat_mean, lat_std, scenes, scaling))
            trainer.train_seconds += time.time() - t0
            window_steps += 1
            if trainer.step % 50 == 0:
                log(f"step {trainer.step} loss {np.mean(losses):.4f} {(time.time() - window_start) / window_steps:.2f} s/step "
                    f"train_min {trainer.train_seconds / 60:.1f}")
                window_start, window_steps, losses = time.time(), 0, []
            if time.time() - last_eval > cfg.eval_minutes * 60:
                figures, images = evaluate(pipe, cfg, cfg.eval_prompts)
                log(f"eval step {trainer.step}: " + " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
                Image.fromarray(image_grid(images)).save(out / "samples_latest.png")
                last_eval = time.time()
            if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
                atomic_save(trainer.state_dict(), ckpt)
                last_ckpt = time.time()
        atomic_save(trainer.state_dict(), ckpt)
        log(f"stopped at step {trainer.step} after {trainer.train_seconds / 60:.1f} training minutes")
        if stop:
            log("interrupted: checkpoint saved, continue with --resume")
            return
    export(trainer, vae, cfg, out / "model")


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, model/)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training-loop minutes in total, across resumes (default 90 unless --steps is given)")
    parser.add_argument("--steps", type=int, default=None, help="stop at this many diffusion steps (whichever first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (settings from recipe.json)")
    parser.add_argument("--export-only", action="store_true", help="only export DIR/model from the latest checkpoint")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override RecipeConfig fields")
    args = parser.parse_args(argv)
    if (args.resume or args.export_only) and (args.out / "recipe.json").exists():
        cfg = RecipeConfig(**json.loads((args.out / "recipe.json").read_text()))
    else:
        cfg = RecipeConfig(seed=args.seed)
        for item in args.set:
            key, value = item.split("=", 1)
            if key not in {f.name for f in dataclasses.fields(RecipeConfig)}:
                raise SystemExit(f"unknown setting {key!r}")
            setattr(cfg, key, json.loads(value))
    minutes = 90.0 if args.minutes is None and args.steps is None else args.minutes
    run(args.out, cfg, minutes, args.steps, args.resume, args.export_only)


if __name__ == "__main__":
    main()
