"""The training loop: stages planned by the schedule plugin, run under accelerate, hooks dispatched.

Per stage: the schedule plugin's plan says what trains; the trainer freezes everything else,
prepares the modules that hold trainable parameters (DDP wraps only those) and the optimizer,
and runs ``plan.steps`` optimizer steps. The LR scheduler is stepped by hand once per optimizer
step, whatever the number of processes. Each optimizer step's global batch and per-sample draws
are pure functions of (seed, stage, step, slot) (see ``data/sample_order.py``), so resumed,
accumulated and multi-process runs see the same data. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import signal
from pathlib import Path

import toml
import torch
from tqdm.auto import tqdm

from .accelerator_options import prepare_for_stage  # kohya's torch_compile, ddp_*, ...
from .atomic_io import atomic_write_text
from .base_weights import merge_base_weights
from .config import EMBEDDED, Config, ConfigError, network_args
from .data.batch_source import DrawSettings, MicroBatchDraws, MicroBatchStream
from .data.captions import expand_token, warn_long_captions
from .data.weighted_captions import check_weighted_captions
from .data.dataset import ImageItem, load_subsets
from .data.latents import LatentSource
from .data.sample_order import SampleOrder, sample_generator, stage_order
from .data.scanning import scan_images_and_held_out
from .diffusion_loss import check_against_model, draw_batch, per_sample_loss, timestep_weighted, training_target
from .family_checks import check_bucket_steps
from .hooks import (
    Batch,
    MainPrediction,
    Plugin,
    StagePlan,
    TrainerState,
    UNetRows,
    instantiate_plugins,
    schedule_of,
    trainer_progress,
)
from .lora_regularisation import LoraRegularisation
from .main_process_checks import checked_on_main_process, process_group_starts, stage_set_up_begins, training_steps_begin
from .models.loading import load_base_model
from .models.trainable import LoraSpec, TrainableModel
from .nan_policy import NanPolicy, NonFiniteLossError, finite_on_every_process
from .outputs import RunFiles
from .plan_report import stage_banner, start_plan
from .plugin_calls import PluginCalls, PluginError, where as step_where
from .plugin_state import resume_plugins
from .resolution import resolved_dict, tracker_hparams, with_epoch_steps
from .resume import (base_identity, batch_shape, check_lora_scales, check_resume_fits, check_resume_within_epochs,
                     load_state, warn_other_batch)
from .rule_changes import warn_older_rules
from .run_lock import RunLocks, clean_leftover_temporaries
from .run_outputs import RunOutputs
from .run_setup import announce, make_accelerator, place_model, release_vae
from .sampling import sample_during_training
from .save_schedule import sample_due, save_due
from .stop_signals import StopSignals, TrainingInterrupted, received_on_any_process
from .text_cache import TextConditioningCache
from .tracking import tracker_init_kwargs, tracker_logging_dir, tracker_name
from .validation import Validation, has_validation
from .weight_guard import WeightGuard

logger = logging.getLogger(__name__)


class Trainer:
    """Runs a :class:`Config`: ``Trainer(config).run()`` returns the paths of the final outputs."""

    def __init__(self, config: Config):
        self.config = config
        self._weight_guard = WeightGuard()  # the weights before each optimizer step, for the NaN guard
        self._nan_policy = NanPolicy(config.nan_policy, config.max_nan_skips)
        self.stops = StopSignals(self._info)  # SIGINT/SIGTERM, handled from the first step (run)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        config = self.config
        output_dir = Path(config.output_dir).expanduser().resolve()
        logging_dir = tracker_logging_dir(config, output_dir)  # kohya's log_prefix: <logging_dir>/<prefix><time>
        # A state that cannot continue this run (another stage kind or optimizer) is refused before anything loads.
        self._resume_progress = check_resume_fits(Path(config.resume), config.stages, base_identity(config)) if config.resume else None
        check_lora_scales(self._resume_progress, config)  # a LoRA's alphas are part of what it learned
        process_group_starts()  # several processes: a refusal another one alone found so far is said at once
        self.accelerator = make_accelerator(config, output_dir, logging_dir)  # from a fresh accelerate state
        warn_other_batch(self._resume_progress, batch_shape(config, self.accelerator.num_processes))
        self.files = RunFiles(output_dir, config.output_name, config.token_string, config.overwrite)
        checked_on_main_process(self.accelerator, lambda: self._claim_outputs(output_dir))  # refused on every process
        device = self.accelerator.device

        held_out = self._scan_data()  # the data is checked before any model loads
        self.entries = [i for i, item in enumerate(self.items) for _ in range(item.num_repeats)]
        # One optimizer step consumes a global batch of batch x processes x accumulation samples.
        self.global_batch = config.train_batch_size * self.accelerator.num_processes * config.gradient_accumulation_steps
        steps_per_epoch = SampleOrder([self.items[i].bucket for i in self.entries], self.global_batch, config.seed, 0).batches_per_epoch
        self.config = config = with_epoch_steps(config, steps_per_epoch)  # the last resolution step, before any model loads
        check_resume_within_epochs(self._resume_progress, config.stages)

        base = load_base_model(
            config.pretrained_model_name_or_path, config.clip_skip, config.v_parameterization,
            config.single_file_config, config.tokenizer_path, config.max_token_length, config.model_family,
            config.zero_terminal_snr, config.vae, disable_mmap=config.disable_mmap_load_safetensors,
        )
        merge_base_weights(base, config.base_weights, config.base_weights_multiplier)  # before any LoRA, cast or mapping
        check_against_model(config, base.noise_scheduler, base.prediction_type)  # timestep bounds, v-prediction options
        self.plugins: list[Plugin] = instantiate_plugins(config)
        self.state = TrainerState(config=config, accelerator=self.accelerator, model=None, output_dir=output_dir,  # type: ignore[arg-type]
                                  schedule=schedule_of(self.plugins))
        self.calls = PluginCalls(self.plugins, self.state)  # every hook through it: a plugin's error names it
        self.state.model = self.model = model = self._build_model(base)
        self.lora_regularisation = LoraRegularisation(config, model)  # kohya's network_dropout, scale_weight_norms
        self.placement = place_model(config, base, model, device, self.accelerator.autocast)
        self.text_cache = TextConditioningCache(model, config.cache_text_encoder_outputs, device, output_dir)
        model.weighted_captions = check_weighted_captions(config.weighted_captions, self.items + held_out)
        warn_older_rules(self._resume_progress, config, self.subsets, self.items, model)  # a state saved by an older version
        warn_long_captions([len(base.tokenizer(expand_token(i.caption, config.token_string, config.num_vectors_per_token),
                                               add_special_tokens=False).input_ids) for i in self.items], config.max_token_length)
        self.latents = LatentSource(base.vae, self.items, config.seed, config.cache_latents or config.cache_latents_to_disk,
                                    config.cache_latents_to_disk, config.vae_batch_size)
        self.latents.fill_cache(self.accelerator)  # several processes: each encodes its share
        self.validation = Validation(config, self.accelerator, model, self.text_cache, held_out, self._info)
        release_vae(self.placement, base.vae, self.latents.cached, device, output_dir)
        self._micro_batches = self._micro_batch_stream()
        trainer_progress(self.state).steps_per_epoch = steps_per_epoch
        if config.log_with:
            self.accelerator.init_trackers(tracker_name(config), config=tracker_hparams(config), init_kwargs=tracker_init_kwargs(config))
        self.outputs = RunOutputs(config, self.accelerator, self.files, model, self.calls, self.state, self.items,
                                  len(self.validation.items), self.placement.vae_offloaded, self._info, self.subsets,
                                  self.global_batch)
        frozen_text = [s.name for s in config.stages if self.text_cache.caches(self.state.stage_trains(s).text_encoders)]
        announce(self._info, config, base, self.placement, device, items=self.items, entries=self.entries,
                 processes=self.accelerator.num_processes, global_batch=self.global_batch, frozen_text=frozen_text,
                 trainable_dtype=self.pivot.vectors.dtype, subsets=self.subsets, output_dir=output_dir)
        resume_plugins(self.state, self._resume_progress, self.plugins)  # on_setup sees the saved step; plugins their state
        self.calls.each("on_setup")

    def _scan_data(self) -> list[ImageItem]:
        """The training images into ``self.items``; returns the images ``validation_split`` holds out (never among them)."""
        config, train_dir = self.config, None
        if config.train_data_dir == EMBEDDED:
            from .embedded_default import default_dataset_dir

            train_dir = default_dataset_dir(config.token_string)
        self.subsets = subsets = load_subsets(config, train_dir)  # the items index them (the LoRA's dataset keys)
        check_bucket_steps(config, subsets)  # kohya's rule for the model's family, before the images are read
        self.items, held_out = scan_images_and_held_out(config, subsets)
        return held_out

    def _build_model(self, base) -> TrainableModel:
        """The pivots and the LoRA on ``base`` (a text-encoder LoRA when a stage trains one, a UNet LoRA unless
        the run's stages train a LoRA and none the UNet's, as kohya's), then the starting weights."""
        config = self.config
        trains = [self.state.stage_trains(s) for s in config.stages]
        self.train_te_lora = any(t.text_encoder_lora for t in trains)
        # without any LoRA training (inversion only) the UNet's still carries a network_weights file through
        unet = any(t.unet_lora for t in trains) or not self.train_te_lora
        conv = network_args(config)
        lora = LoraSpec(config.network_dim, config.network_alpha, int(conv.get("conv_dim", 0)), conv.get("conv_alpha", 1.0),
                        text_encoders=self.train_te_lora, unet=unet)
        try:
            model = TrainableModel.build(base, config.token_string, config.num_vectors_per_token, config.init_words, lora,
                                         config.seed)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"preset: {exc}") from exc
        self.pivot = model.pivots[0]
        self._load_starting_weights(model)
        return model

    def _micro_batch_stream(self) -> MicroBatchStream:
        """The run's micro-batch draws (see ``data/batch_source.py``), built in ``max_data_loader_n_workers`` processes."""
        config, accelerator = self.config, self.accelerator
        buckets = [self.items[i].bucket for i in self.entries]
        orders = [stage_order(config, i, buckets, self.global_batch) for i in range(len(config.stages))]
        settings = DrawSettings(config.seed, config.token_string, config.num_vectors_per_token, config.train_batch_size,
                                accelerator.num_processes, accelerator.process_index, self.latents.cached)
        return MicroBatchStream(MicroBatchDraws(self.items, self.entries, orders, settings), config.max_data_loader_n_workers,
                                config.persistent_data_loader_workers, config.gradient_accumulation_steps)

    def _claim_outputs(self, output_dir: Path) -> None:
        """Lock this run's names in ``output_dir``, its output_name's and its token's (a second run writing either is
        refused), remove a killed run's temporaries, and refuse to overwrite an earlier run's files."""
        config = self.config
        self._locks = RunLocks(output_dir, {"output_name": config.output_name, "token_string": config.token_string})
        self._locks.acquire()
        clean_leftover_temporaries(output_dir, config.output_name, config.token_string)
        resumed_step = self._resume_progress.global_step if self._resume_progress else None
        self.files.check_new_run(resuming=bool(config.resume), resumed_step=resumed_step)

    def _load_starting_weights(self, model) -> None:
        """``weights``: the pivot's initial vectors from an embedding file; ``network_weights``: the LoRA's."""
        from .checked_files import take
        from .formats.embedding import load_embedding
        from .formats.kohya_lora import kohya_to_peft, load_lora

        config = self.config
        if config.weights:
            vectors = load_embedding(config.weights, expected_dim=self.pivot.vectors.shape[1], token=config.token_string)
            if vectors.shape[0] != config.num_vectors_per_token:
                raise ConfigError(f"key 'weights': {config.weights} holds {vectors.shape[0]} vector(s), "
                                  f"num_vectors_per_token is {config.num_vectors_per_token}")
            self.pivot.reset_init(vectors)
        if config.network_weights:
            tensors = take(config.network_weights, lambda path: load_lora(path)[0])  # as the start-up check read it
            states, alphas = kohya_to_peft(tensors, model.components(), model.family.key_table)
            model.load_network_weights(config.network_weights, states, alphas, text_encoder_lora=self.train_te_lora)

    def _info(self, message: str) -> None:
        if self.accelerator.is_main_process:
            logger.info(message)
            print(message, flush=True)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Path]:
        """Train every stage and write the final outputs; see the module docstring.

        Raises ``NonFiniteLossError`` (nan_policy), ``PluginError`` (a plugin's hook: ``plugin_calls.py``; a hook's
        ``ConfigError`` after the set-up too) and ``TrainingInterrupted`` (signals) after saving the last good state
        under ``*-interrupted-*`` names with the command that resumes it.
        """
        self._locks = self._micro_batches = None
        previous = {}
        try:
            self._setup()
            previous = self.stops.install()
            return self._run()
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc}\n{self.outputs.save_last_finite(self.optimizer, self._resume_progress)}") from None
        except PluginError as exc:  # a plugin's hook raised or broke the contract: the last finished step is saved
            exc.saved = self.outputs.save_after_plugin_error(getattr(self, "optimizer", None), self._resume_progress, exc.hook)
            raise
        except ConfigError:  # a hook's refusal after the set-up: the last finished step saved, said above the error
            hook = self.calls.refused_in if hasattr(self, "calls") else None
            if hook not in (None, "on_setup") and self.accelerator.is_main_process:
                self._info(self.outputs.save_after_plugin_error(getattr(self, "optimizer", None), self._resume_progress, hook))
            raise
        finally:
            if self._locks is not None:
                self._locks.release()
            if self._micro_batches is not None:
                self._micro_batches.close()
            StopSignals.restore(previous)  # last: a signal while the locks are released still meets this run's handler

    def _run(self) -> dict[str, Path]:
        config = self.config
        start_stage, start_step, resumed = 0, 0, None
        if config.resume:
            resumed = load_state(self._resume_progress, self.model.trainable_tensors(), self.accelerator.scaler)  # fp16's loss scale too
            progress = resumed.progress
            start_stage, start_step = progress.stage_index, progress.stage_step  # the state's position: set before on_setup
            self._info(f"resumed from {config.resume}: stage {start_stage}, step {start_step}")
        if self.accelerator.is_main_process:  # a resume's too: its printed resume command reads the settings it ran with
            atomic_write_text(self.files.config_toml, toml.dumps(resolved_dict(config)))
        first_samples = []
        if config.sample_prompts and config.sample_at_first and not config.resume:
            first_samples = sample_during_training(self.sample, "first", self.stops)
        for stage_index in range(start_stage, len(config.stages)):
            first_step = start_step if stage_index == start_stage else 0
            self._run_stage(stage_index, first_step, resumed if stage_index == start_stage else None)
        outputs = self.outputs.save(self.optimizer, with_state=config.save_state)  # kohya's save_state saves the state at the end too
        if self.stops.received:  # during the final save: the files are complete, so the run ends here
            self._info(f"{signal.Signals(self.stops.received).name} received during the final save: the files are saved; "
                       "stopping without the final samples")
        elif config.sample_prompts:
            outputs["samples"] = sample_during_training(self.sample, "final", self.stops)
            if first_samples and outputs["samples"] and self.accelerator.is_main_process:
                from .sampling import write_grid

                outputs["before_after"] = self.files.before_after_grid
                write_grid([first_samples, outputs["samples"]], outputs["before_after"])
        self.calls.each("on_end")
        self.accelerator.end_training()
        return outputs

    def _run_stage(self, stage_index: int, first_step: int, resumed) -> None:
        config, state, accelerator = self.config, self.state, self.accelerator
        stage = config.stages[stage_index]
        stage_set_up_begins()  # several processes: ends an earlier stage's steps; a refusal each finds is said once
        position = trainer_progress(state)  # what plugins read from the state, read-only
        position.stage, position.stage_index, position.stage_step = stage, stage_index, first_step
        plan: StagePlan = self.calls.call(schedule_of(self.plugins), "plan_stage", stage)
        start_plan(state, plan)  # checked (naming the schedule), the state's plan, recorded for the saved metadata
        if resumed is not None:
            resumed.load_into(plan.optimizer, plan.lr_scheduler, plan.param_groups, f"stage {stage_index} ({stage.name!r})")
        trainable = [p for group in plan.param_groups for p in group["params"]]
        trains = self.model.set_trainable(trainable, plan.lora_enabled)
        # DDP wraps only the modules that hold trainable parameters (a UNet with none must not be wrapped).
        forwards = {name: prepare_for_stage(accelerator, module) for name, module in self.model.components().items() if trains[name]}
        self.model.use_forwards(forwards, accelerator.autocast)
        self.optimizer = accelerator.prepare(plan.optimizer)
        self.ddp_modules = list(forwards.values())
        self.trainable = trainable
        order = self._micro_batches.draws.orders[stage_index]
        self._micro_batches.start_stage(stage_index, first_step, plan.steps)
        self._info(stage_banner(state, plan))  # the plan that runs (the preset's stage for the built-in schedule)
        self.calls.each("on_stage_start")
        returns_before = self.model.text_returns
        self.validation.start_stage(plan, order.batches_per_epoch)  # before the text encoders may leave the device
        offloaded = self.text_cache.start_stage(plan.trains.text_encoders, self.items, config.token_string,
                                                config.num_vectors_per_token)
        if offloaded:
            self._info(offloaded)
        progress = tqdm(total=plan.steps, initial=first_step, desc=stage.name, disable=not accelerator.is_main_process)
        training_steps_begin()  # several processes: from here a refusal is each one's own, said at once (cli._fail)
        while state.stage_step < plan.steps:
            logs = self._optimizer_step(plan)
            self.lora_regularisation.after_step()  # max-norm; its values are read when the step is logged
            position.stage_step += 1
            position.global_step += 1
            progress.set_postfix(loss=f"{logs['loss']:.4f}", stage=stage.name, **self.validation.postfix,  # + val_loss
                                 refresh=False)  # shown by update's refresh,
            progress.update(1)  # which tqdm rate-limits (a refresh per step formats and writes the bar every step)
            self.calls.each("on_step_end", logs)
            logs |= self.validation.after_step(state, logs)  # validation_split's held-out loss, when due
            self._after_step(logs, order)
            self._stop_if_signalled()
        progress.close()
        self.text_cache.end_stage()
        if offloaded and self.model.text_returns > returns_before:
            self._info("the text encoders came back to the device during the stage (an encode needed them)")
        self.calls.each("on_stage_end")
        self.model.use_forwards({}, accelerator.autocast)
        accelerator.free_memory()

    def _stop_if_signalled(self) -> None:
        """After a step: if any process got SIGINT/SIGTERM, every process saves-and-stops together."""
        signum = self.stops.received
        if self.accelerator.num_processes > 1:  # one collective (a device sync); one process reads its own signal
            signum = received_on_any_process(signum, self.accelerator)  # the signal sent, in every process
        if not signum:
            return
        paths = self.outputs.save_on_stop(self.optimizer)
        raise TrainingInterrupted(
            f"interrupted by {signal.Signals(signum).name} after step {self.state.global_step}\n{self.outputs.resume_hint(paths)}",
            signum,
        )

    def _optimizer_step(self, plan: StagePlan) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; applies nan_policy.

        Two device syncs a step (one process): before the optimizer step, whether the loss terms and
        the gradients are finite (a non-finite loss is backpropagated like any other and its step
        skipped); after it, whether the weights are, read with the logged loss terms."""
        config, accelerator, state = self.config, self.accelerator, self.state
        accum = config.gradient_accumulation_steps
        totals: dict[str, torch.Tensor] = {}  # per term, summed over micro-batches on the device
        for k in range(accum):
            batch = self._local_batch(state.stage_step, k)
            with contextlib.ExitStack() as sync:
                if k < accum - 1:
                    for module in self.ddp_modules:
                        sync.enter_context(accelerator.no_sync(module))
                sync.enter_context(self.lora_regularisation.step(state.stage_index, state.stage_step, batch.slots))
                terms = self._loss_terms(batch, state.stage_step)
                loss = functools.reduce(operator.add, terms.values())  # no "0 +" nor "/ 1": each a kernel on a GPU
                accelerator.backward(loss / accum if accum > 1 else loss)
            for name, value in terms.items():
                share = value.detach().float() / accum if accum > 1 else value.detach().float()
                totals[name] = totals[name] + share if name in totals else share
        values = torch.stack(list(totals.values()))  # [terms] float32
        clip_first = config.max_grad_norm > 0 and accelerator.scaler is None  # fp16: unscale only a step that is taken
        norm = accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm) if clip_first else None  # 0-dim
        if not bool(finite_on_every_process(values, self.trainable, accelerator, norm)):  # sync 1
            return self._skip_non_finite(dict(zip(totals, values.tolist())))
        self._nan_policy.step_was_finite()
        if config.max_grad_norm > 0 and not clip_first:
            accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self._weight_guard.keep(self.trainable)
        self.optimizer.step()
        read = torch.cat([self._weight_guard.finite().float().reshape(1).to(values.device), values]).tolist()  # sync 2
        if not read[0]:
            self._weight_guard.restore()
            raise NonFiniteLossError(f"the weights became non-finite in the optimizer step at stage {state.stage_index} "
                                     f"({state.stage.name!r}), step {state.stage_step + 1}; the weights before it are kept")
        if not accelerator.optimizer_step_was_skipped:
            plan.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        per_term = dict(zip(totals, read[1:]))
        logs = {"loss": sum(per_term.values())} | {f"loss/{k}": v for k, v in per_term.items()}
        for group in plan.param_groups:
            logs[f"lr/{group['name']}"] = float(self.optimizer.param_groups[plan.param_groups.index(group)]["lr"])
        return logs

    def _skip_non_finite(self, per_term: dict[str, float]) -> dict[str, float]:
        """A step whose loss or gradients are non-finite (``per_term``: this process's loss terms): drop
        the gradients, then skip or stop as ``nan_policy`` says."""
        state = self.state
        self.optimizer.zero_grad(set_to_none=True)
        where = step_where(state, "on_step_start")  # the step being taken, as a plugin's error names it
        self._info(self._nan_policy.skip_or_stop(per_term, where, self.accelerator.num_processes))
        return {"loss": float("nan"), "skipped_nonfinite": 1.0}

    def _local_batch(self, step: int, micro: int) -> Batch:
        """This process's share of micro-batch ``micro`` of optimizer step ``step``: latents, ids, captions.

        The draws come from the micro-batch stream; the latents from the cache, or encoded here from the drawn pixels.
        """
        drawn = self._micro_batches.get(self.state.stage_index, step, micro)
        latents = [self.latents.latent_for(i, a, p) for i, a, p in zip(drawn.item_indices, drawn.augmentations, drawn.pixels)]
        input_ids = self.model.tokenize_captions(drawn.captions)  # kohya's weighted_captions parsed there
        device = self.accelerator.device
        return Batch(torch.stack(latents).to(device), input_ids.to(device), drawn.captions, drawn.paths, drawn.slots,
                     drawn.is_reg, sizes=drawn.sizes.to(device),  # sizes [b, 6]; loss masks [b, 1, h, w] or None
                     loss_masks=self.latents.loss_masks(drawn, latents[0].shape[-2:], device))

    def _loss_terms(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Main denoising loss and every plugin term for one micro-batch of optimizer step ``step`` (scalars)."""
        config, state, model = self.config, self.state, self.model
        generators = [sample_generator(config.seed, state.stage_index, step, slot, 0x9015E) for slot in batch.slots]
        # the target's noise [b, 4, h, w] float32, timesteps [b] int64, the input's noise (ip_noise_gamma perturbs it)
        noise, t, input_noise = draw_batch(generators, batch.latents, config, state.num_train_timesteps)
        scheduler = model.base.noise_scheduler
        noisy = scheduler.add_noise(batch.latents, input_noise, t)
        batch.noisy_latents, batch.timesteps = noisy, t
        self.calls.each("on_step_start", batch)
        cond = self.text_cache.conditioning(batch)  # hidden states [b, 77, d] (+ SDXL's pooled embedding and time ids)
        extra = self.calls.rows(batch, noisy, t, cond)  # [(plugin, its UNetRows)], checked against the main rows
        prediction_all = model.predict(*UNetRows.joined(noisy, t, cond, [r for _, r in extra]))
        b = noisy.shape[0]
        prediction = prediction_all[:b] if extra else prediction_all  # a slice's backward would copy the gradient
        prediction_type = model.base.prediction_type
        target = training_target(scheduler, batch.latents, noise, t, prediction_type)
        per_sample = per_sample_loss(prediction, target, scheduler, t, config, batch.loss_masks)  # [b] (loss_type, mask)
        if any(batch.is_reg):  # kohya: a regularisation sample's loss is multiplied by prior_loss_weight
            per_sample = per_sample * torch.tensor([config.prior_loss_weight if r else 1.0 for r in batch.is_reg], device=per_sample.device)
        per_sample = timestep_weighted(per_sample, scheduler, t, config, prediction_type)  # Min-SNR, debiased ...
        terms = {"main": per_sample.mean()}
        main = MainPrediction(noisy, t, cond, prediction, target)
        offset = b
        row_outputs = {}
        for plugin, r in extra:
            n = r.noisy_latents.shape[0]
            row_outputs[id(plugin)] = prediction_all[offset : offset + n]
            offset += n
        self.calls.losses(terms, batch, main, row_outputs)  # each a 0-dim floating tensor, as <plugin>/<term>
        return terms

    # ------------------------------------------------------------------ logs, samples, saves
    def _after_step(self, logs: dict[str, float], order: SampleOrder) -> None:
        config, state = self.config, self.state
        kohya_keys = self.outputs.tracker_keys.after_step(state, logs)  # every step: kohya's average, epoch values
        if state.global_step % config.log_every_n_steps == 0 or state.stage_step == state.plan.steps or has_validation(logs):
            entry = {"global_step": state.global_step, "stage": state.stage.name, "stage_step": state.stage_step}
            entry |= logs | self.lora_regularisation.logs() | self.pivot.distance_from_init()
            entry |= self.calls.logged(entry)  # the plugins' state.logs, none of the trainer's keys
            self.outputs.write_log(entry, state.global_step, kohya_keys)
            state.logs = {}
        if save_due(config, state, order.batches_per_epoch):
            self.outputs.save(self.optimizer, tag=f"step{state.global_step:08d}", with_state=config.save_state)
        if sample_due(config, state, order.batches_per_epoch):  # sample_every_n_epochs or sample_every_n_steps
            sample_during_training(self.sample, f"step{state.global_step:08d}", self.stops)

    def sample(self, tag: str) -> list[Path]:
        """Generate the sample prompts with the current model into ``samples/`` (main process only)."""
        return self.outputs.sample(tag)
