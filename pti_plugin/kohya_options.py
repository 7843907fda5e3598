"""kohya sd-scripts options (``train_network.py`` / ``train_textual_inversion.py``) that pti-plugin refuses.

Every kohya option is either a key of :class:`pti_plugin.config.Config` (supported, same meaning)
or listed here with the reason it is refused. A refused option in a preset or on the command line
stops the run before any model loads, naming the option — never silently ignored — unless its value asks
for nothing (:func:`asks_for_nothing`): kohya's ``--output_config`` writes every option, ``v2 = false``
and ``network_module = "networks.lora"`` included, and such a file should load.
"""

from typing import Any

_NOT_YET = "not implemented yet"
_SD2 = "pti-plugin trains SD1.5 and SDXL models"
_HUB = "pti-plugin never talks to a model hub; runs are local and offline"
_CONSOLE = ("pti-plugin's console shows warnings and errors, the info lines naming the options it leaves out while "
            "the configuration is read, and the run's own lines (the start-up block, each stage's start, saved states; "
            "progress bars), at fixed levels; the run's log is its JSONL/TensorBoard files")

REFUSED_OPTIONS: dict[str, str] = {
    # model
    "v2": _SD2 + " (SD2.x is not supported)",
    "sdxl": "the model family is detected from the weights (set model_family = \"sdxl\" to force it)",
    "no_half_vae": "the VAE always runs in float32 here (true, what it asks for, is accepted)",
    "lowram": "the model is loaded into RAM and then moved to the device; loading it onto the GPU directly (kohya's "
              "lowram) is not implemented",
    "highvram": "pti-plugin never clears the CUDA cache while caching latents, the low-VRAM step that highvram turns "
                "off (true is accepted)",
    "full_fp16": "needs fp16 gradients unscaled by a patched GradScaler (kohya patches torch); use full_bf16 with "
                 'mixed_precision = "bf16", or mixed_precision = "fp16" (float32 trainables with a gradient scaler)',
    # optimizer / scheduler
    "fused_backward_pass": _NOT_YET,
    # network
    "network_module": "pti-plugin always trains networks.lora (peft LoRA)",
    "no_token_padding": "prompts are always padded to 77 tokens as at inference",
    # saving / hub / logging
    "huggingface_repo_id": _HUB,
    "huggingface_repo_type": _HUB,
    "huggingface_path_in_repo": _HUB,
    "huggingface_token": _HUB,
    "huggingface_repo_visibility": _HUB,
    "save_state_to_huggingface": _HUB,
    "resume_from_huggingface": _HUB,
    "async_upload": _HUB,
    "wandb_run_name": 'only log_with = "tensorboard" is supported',
    "wandb_api_key": 'only log_with = "tensorboard" is supported',
    "output_config": "the resolved config is always written beside the outputs",
    # distributed / loader
    "skip_until_initial_step": "use resume",
    "initial_epoch": "use resume",
    "initial_step": "use resume",
    "cpu_offload_checkpointing": _NOT_YET,
    # dataset (top-level forms; the others are keys of the preset)
    "skip_cache_check": "the latent disk cache is keyed by bucket size and flip; there is no check to skip",
    "dataset_class": "custom dataset classes are not supported",
    "cache_info": "image sizes and captions are read at every start (no metadata_cache.json)",
    "conditioning_data_dir": "set it in a dataset_config subset, with masked_loss = true (kohya's train_network reads it "
                             "only there; ControlNet training is not supported)",
    "cache_text_encoder_outputs_to_disk": "text-encoder outputs are cached in memory only (cache_text_encoder_outputs)",
    # kohya's logging set-up and DeepSpeed
    "console_log_level": _CONSOLE,
    "console_log_file": _CONSOLE,
    "console_log_simple": _CONSOLE,
    **dict.fromkeys(("deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                     "offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                     "fp16_master_weights_and_gradients"), "DeepSpeed is not supported"),
}


#: Refused options whose value, beside the "off" values every option has (false, empty), is what pti-plugin
#: does anyway: kohya's own default for them, or the switch that asks for what pti-plugin always does (its VAE runs
#: in float32; it never clears the CUDA cache after caching latents).
WHAT_PTI_DOES: dict[str, Any] = {"network_module": "networks.lora", "no_half_vae": True, "highvram": True,
                                 "zero_stage": 2}  # kohya's default, read with deepspeed only

#: Refused options that kohya reads only beside another refused option, where any name asks for nothing alone: the
#: wandb run's name (read with log_with = "wandb"), which the kohya_ss GUI always writes (its output_name).
NAMES_ONLY_BESIDE_A_REFUSED_OPTION = ("wandb_run_name",)


def asks_for_nothing(key: str, value: Any) -> bool:
    """Whether refused option ``key`` set to ``value`` asks for nothing pti-plugin lacks: false, an empty string,
    list or table, :data:`WHAT_PTI_DOES`'s value (of its type: ``highvram = 1`` is no ``true``), or any name given to
    an option of :data:`NAMES_ONLY_BESIDE_A_REFUSED_OPTION`."""
    expected = WHAT_PTI_DOES.get(key, object())
    return value is False or (isinstance(value, (str, list, dict)) and not value) or (
        type(value) is type(expected) and value == expected) or (
        key in NAMES_ONLY_BESIDE_A_REFUSED_OPTION and isinstance(value, str))


def markdown_table() -> str:
    """The README table of refused kohya options (``python -m pti_plugin.kohya_options``)."""
    rows = [f"| `{name}` | {reason} |" for name, reason in sorted(REFUSED_OPTIONS.items())]
    return "\n".join(["| kohya option | why it is refused |", "| --- | --- |", *rows])


if __name__ == "__main__":
    print(markdown_table())
