"""kohya's validation loss (``validation_split``, ``validation_seed``, ``validate_every_n_steps``,
``validate_every_n_epochs``, ``max_validation_steps``): the training objective on the held-out images
(``data/validation_split.py``), comparable from one validation to the next.

What is measured: the main denoising loss exactly as training computes it (``diffusion_loss``: the noise with its
options, the target, ``loss_type``, the loss masks, the Min-SNR / v-prediction / debiased weights) with the model as
the stage has it (pivot, LoRA switched as the stage switches it), under ``torch.no_grad`` with every module in eval
mode. Plugin terms (``pivot_locality``) are not part of it, and no plugin hook runs for it: it is the held-out
denoising loss alone. Each held-out image is taken once, unaugmented (no flip, centred crop, no colour jitter), with
its caption as written (no dropout, shuffle or tag dropout; the first line, or a fixed draw of a line and
``{a|b}`` choices with wildcards); each is evaluated at kohya's 4 fixed timesteps, evenly inside
[min_timestep, max_timestep) (200, 400, 600, 800 on a 1000-step schedule), with noise from a generator seeded by
(``validation_seed`` or ``seed``, image, timestep). So every validation sees the same images, noise and timesteps:
its value changes only when the weights do. The draws come from their own generators, never from a training
generator nor torch's global one, so a run validates without changing what it trains (tested bit for bit).

When (kohya's rules, per stage, both stages: the inversion stage's validation measures the pivot alone): every
``validate_every_n_steps`` global steps, and at the end of every ``validate_every_n_epochs``-th epoch of a stage
(every epoch when unset; the stage's last, partial epoch counts), both when both fall on one step (computed once,
logged under both names). ``max_validation_steps``: the first N held-out batches (batches of ``train_batch_size``
images of one bucket, buckets in the order of their first held-out image).

Logged (the step's JSONL entry, written at every validating step, and TensorBoard through the same entry):
``loss/validation/step_average`` / ``loss/validation/epoch_average``, the mean over the held-out images and
timesteps, and ``.../step_divergence`` / ``.../epoch_divergence``, that minus the mean main training loss of the
stage's last epoch of steps (kohya's moving average, its running total kept as kohya keeps it:
``tracker_keys.LossRecorder``; it restarts with each stage and after a resume); the progress
bar shows ``val_loss``. Several processes: each computes every N-th batch and the sums are reduced, so every
process holds the value of the whole held-out set.

Differences from kohya: kohya averages batch means and keeps, within the first epoch, a running mean over every
validation so far; here each value is that validation's own mean per image and timestep. kohya validates augmented
images with captions as drawn (dropout, shuffle); here the plain image and caption. kohya on several GPUs logs the
first process's share; here the whole set. kohya logs epoch values at the epoch number on TensorBoard; here at the
global step (stages count epochs from 1 each).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config, first_of
from .data.augment import Augmentation
from .data.batch_source import draw_inputs
from .data.buckets import size_conditioning
from .data.captions import final_caption
from .data.dataset import ImageItem
from .data.latents import LatentSource
from .data.sample_order import sample_generator
from .diffusion_loss import draw_batch, per_sample_loss, timestep_bounds, timestep_weighted, training_target
from .models.family import Conditioning
from .save_schedule import nth_epoch_ends
from .tracker_keys import LossRecorder

#: kohya's number of fixed validation timesteps (``NUM_VALIDATION_TIMESTEPS``).
NUM_VALIDATION_TIMESTEPS = 4
#: ``sample_generator`` streams of the validation noise (per image and timestep) and caption (per image).
NOISE_STREAM, CAPTION_STREAM = 0x7A11D, 0x7A11C
#: The logged keys start with this (kohya's names: ``step_average``, ``step_divergence``, ``epoch_*``).
KEY_PREFIX = "loss/validation/"
PLAIN = Augmentation()  # no flip, centred crop, no colour change: what the latent cache serves


def validation_timesteps(config: Config, num_train_timesteps: int) -> list[int]:
    """kohya's fixed timesteps: ``linspace(min_timestep, max_timestep, 6)[1:-1]`` as integers (max_timestep unset: the
    schedule's length)."""
    low, high = timestep_bounds(config, num_train_timesteps)
    return [int(t) for t in np.linspace(low, high, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]]


def validation_caption(item: ImageItem, seed: int, index: int, token: str, num_vectors: int) -> str:
    """The caption of held-out image ``index``: :func:`final_caption` without dropout, shuffling or tag dropout,
    from a generator of its own (a line and ``{a|b}`` choices with wildcards; the same at every validation)."""
    options = dataclasses.replace(item.caption_options, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                                  shuffle_caption=False, caption_tag_dropout_rate=0.0)
    generator = sample_generator(seed, CAPTION_STREAM, index)
    return final_caption(dataclasses.replace(item, caption_options=options), generator, 1, token, num_vectors)


def validation_batches(items: list[ImageItem], batch_size: int, max_batches: int | None) -> list[list[int]]:
    """The held-out images' indices in batches of one bucket (at most ``batch_size``; buckets in the order of their
    first image), the first ``max_batches`` of them (all when None)."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).append(index)
    batches = [ids[k : k + batch_size] for ids in by_bucket.values() for k in range(0, len(ids), batch_size)]
    return batches[:max_batches] if max_batches else batches


@contextlib.contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """``modules`` in eval mode inside the block; each submodule's own mode back after it."""
    modules = list(modules)
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class Validation:
    """The run's validation: inert (every call returns at once) without held-out images."""

    def __init__(self, config: Config, accelerator, model, text_cache, items: list[ImageItem], info: Callable[[str], None]):
        self.config, self.accelerator, self.model, self.text_cache, self.items = config, accelerator, model, text_cache, items
        self.enabled = bool(items)
        self.postfix: dict[str, str] = {}  # shown on the progress bar: the last validation loss
        self.recent = LossRecorder(1)  # the stage's main training loss: kohya's moving average (start_stage)
        self.rows: dict[str, Conditioning] | None = None  # this stage's cached conditionings (frozen text side)
        self.stage_steps = self.steps_per_epoch = 1
        if not self.enabled:
            return
        self.seed = config.validation_seed if config.validation_seed is not None else config.seed
        self.num_train_timesteps = int(model.base.noise_scheduler.config.num_train_timesteps)
        self.timesteps = validation_timesteps(config, self.num_train_timesteps)
        self._draw_configs = [dataclasses.replace(config, min_timestep=t, max_timestep=t) for t in self.timesteps]
        self.batches = validation_batches(items, config.train_batch_size, config.max_validation_steps)
        self.captions = [validation_caption(item, self.seed, i, config.token_string, config.num_vectors_per_token)
                         for i, item in enumerate(items)]
        plain = [dataclasses.replace(i, flip_aug=False, color_aug=False, random_crop=False) for i in items]
        cache = config.cache_latents or config.cache_latents_to_disk
        self.latents = LatentSource(model.base.vae, plain, config.seed, cache, config.cache_latents_to_disk, config.vae_batch_size)
        self.latents.fill_cache(accelerator)  # the training images' cache path: in memory, on disk beside each image
        names = first_of([i.path.name for i in items], 8)
        every = config.validate_every_n_epochs
        when = (f"every {config.validate_every_n_steps} global step(s) and " if config.validate_every_n_steps else "") + (
            f"every {every} epoch(s) of each stage" if every else "every epoch of each stage")
        info(f"validation: {len(items)} held-out image(s) ({names}), never trained on; {len(self.batches)} batch(es) "
             f"at timesteps {self.timesteps}, seed {self.seed}; {when}")

    def start_stage(self, plan, steps_per_epoch: int) -> None:
        """A stage begins (``plan``: its :class:`~pti_plugin.hooks.StagePlan`): the training-loss window restarts; in a
        stage that caches text-encoder outputs, the validated captions are encoded now, before the encoders may leave
        the device (and kept apart from the training cache, which they must not change)."""
        self.recent = LossRecorder(steps_per_epoch)
        self.stage_steps, self.steps_per_epoch, self.rows = plan.steps, steps_per_epoch, None
        if not self.enabled or not self.text_cache.caches(plan.trains.text_encoders):
            return
        self.rows = self.text_cache.encoded_rows(sorted({self.captions[i] for batch in self.batches for i in batch}))

    def after_step(self, state, logs: dict[str, float]) -> dict[str, float]:
        """After an optimizer step (``logs``: its logs): the validation's logs when one is due, else {}."""
        if not self.enabled:
            return {}
        main = logs.get("loss/main")
        if main is not None and math.isfinite(main):
            self.recent.add(main)
        every = self.config.validate_every_n_steps
        step_due = bool(every) and state.global_step % every == 0
        epoch_due = nth_epoch_ends(self.config.validate_every_n_epochs, state.stage_step, self.stage_steps,
                                         self.steps_per_epoch)
        if not (step_due or epoch_due):
            return {}
        value = self.loss()
        self.postfix = {"val_loss": f"{value:.4f}"}
        training = self.recent.moving_average if self.recent.losses else math.nan
        out: dict[str, float] = {}
        for kind, due in (("step", step_due), ("epoch", epoch_due)):
            if due:
                out |= {f"{KEY_PREFIX}{kind}_average": value, f"{KEY_PREFIX}{kind}_divergence": value - training}
        return out

    @torch.no_grad()
    def loss(self) -> float:
        """The validation loss of the model as it is now: the mean over the held-out images of the validated batches
        and the timesteps, the same in every process (each computes its share; the sums are reduced)."""
        accelerator = self.accelerator
        mine = self.batches[accelerator.process_index :: accelerator.num_processes]
        totals = torch.zeros(2, dtype=torch.float64)  # sum, count (on the CPU: no float64 on some devices)
        bar = tqdm(total=len(mine) * len(self.timesteps), desc="validation", leave=False,
                   disable=not accelerator.is_main_process)
        with eval_mode([*self.model.components().values(), self.model.base.vae]):
            for batch in mine:
                losses = self.batch_losses(batch, bar.update)
                totals += torch.tensor([losses.double().sum().item(), losses.numel()], dtype=torch.float64)
        bar.close()
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        total, count = totals.tolist()
        return total / count

    def batch_losses(self, indices: list[int], progress: Callable[[int], object] = lambda n: None) -> torch.Tensor:
        """The weighted per-sample losses [len(indices) x timesteps] (timestep-major) of the held-out images
        ``indices`` (one bucket), as training computes its main loss."""
        model, config, device = self.model, self.config, self.accelerator.device
        items = [self.items[i] for i in indices]
        drawn = [draw_inputs(self.latents.items[i], PLAIN, self.latents.cached) for i in indices]  # (pixels, mask)
        latents = torch.stack([self.latents.latent_for(i, PLAIN, p) for i, (p, _) in zip(indices, drawn)]).to(device)
        captions = [self.captions[i] for i in indices]
        sizes = torch.tensor([size_conditioning(i.image_size, i.bucket) for i in items], dtype=torch.float32).to(device)
        if self.rows is not None:  # the training path of a stage that caches text-encoder outputs
            cond = Conditioning.cat([self.rows[c] for c in captions]).with_extra(model.family.size_conditioning(sizes))
        else:
            cond = model.weigh(model.encode(model.tokenize_captions(captions).to(device), sizes=sizes), captions)
        masks = self.latents.stacked_masks(indices, [PLAIN] * len(indices), latents.shape[-2:], device, [m for _, m in drawn])
        scheduler, prediction_type = model.base.noise_scheduler, model.base.prediction_type
        out = []
        for k, draw_config in enumerate(self._draw_configs):
            generators = [sample_generator(self.seed, NOISE_STREAM, i, k) for i in indices]
            noise, t, input_noise = draw_batch(generators, latents, draw_config, self.num_train_timesteps)
            prediction = model.predict(scheduler.add_noise(latents, input_noise, t), t, cond)
            target = training_target(scheduler, latents, noise, t, prediction_type)
            per_sample = per_sample_loss(prediction, target, scheduler, t, config, masks)
            out.append(timestep_weighted(per_sample, scheduler, t, config, prediction_type))
            progress(1)
        return torch.cat(out)


def has_validation(logs: dict[str, float]) -> bool:
    """Whether a step's logs hold a validation (such a step is always written to the log)."""
    return any(key.startswith(KEY_PREFIX) for key in logs)


__all__ = ["Validation", "has_validation", "validation_batches", "validation_caption",
           "validation_timesteps"]
