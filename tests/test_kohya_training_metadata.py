"""kohya's training metadata in the LoRA, the newer ``metadata_*`` options and ``dim_from_weights``.

The expectations are kohya sd-scripts' own, written out here as literal strings: ``train_network.py`` builds its
metadata from the argparse values (``"ss_noise_offset": args.noise_offset``, ``"ss_debiased_estimation":
bool(args.debiased_estimation_loss)``, ...) and writes ``{k: str(v)}``, so an option left at kohya's default of
None reads ``"None"``, a switch ``"True"``/``"False"``, a float ``"0.05"``. A ``--vae`` or model path that exists is
named by its base name with ``model_hash`` (sha256 of the 64 KiB at 1 MiB, 8 hex digits) and ``calculate_sha256``
(a folder: ``"IsADirectory"``). ``library/sai_model_spec.py``: every other ``metadata_<field>`` option is written as
``modelspec.<field>``, as given, in the LoRA and the embedding. ``networks/lora.py`` ``create_network_from_weights``
(``dim_from_weights``): each module's rank from its ``lora_down`` and its alpha from the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import toml
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer

SETTINGS = {
    "loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2, "huber_scale": 1.5,
    "noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01,
    "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True, "debiased_estimation_loss": True,
    "max_grad_norm": 0.5, "seed": 7, "cache_latents": True, "min_timestep": 100, "max_timestep": 900,
    "metadata_usage_hint": "Use tok1 at weight 1", "metadata_merged_from": "a, b",
    "metadata_preprocessor": "none", "metadata_is_negative_embedding": "false", "validate_every_n_steps": 3,
}
#: What kohya writes for SETTINGS (and the options left unset), key by key.
KOHYA_WRITES = {
    "ss_loss_type": "huber", "ss_huber_schedule": "exponential", "ss_huber_c": "0.2", "ss_huber_scale": "1.5",
    "ss_noise_offset": "0.05", "ss_noise_offset_random_strength": "True", "ss_adaptive_noise_scale": "0.01",
    "ss_ip_noise_gamma": "0.1", "ss_ip_noise_gamma_random_strength": "True", "ss_debiased_estimation": "True",
    "ss_max_grad_norm": "0.5", "ss_seed": "7", "ss_cache_latents": "True",
    # unset: kohya's default None, or its default value
    "ss_min_snr_gamma": "None", "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3",
    "ss_clip_skip": "None", "ss_max_token_length": "None", "ss_zero_terminal_snr": "False",
    "ss_gradient_checkpointing": "False", "ss_gradient_accumulation_steps": "1", "ss_mixed_precision": "no",
    "ss_caption_dropout_rate": "0.0", "ss_caption_dropout_every_n_epochs": "0", "ss_caption_tag_dropout_rate": "0.0",
    "ss_prior_loss_weight": "1.0",
    "ss_validate_every_n_steps": "3", "ss_validation_split": "0.0", "ss_validation_seed": "None",
    "ss_max_validation_steps": "None", "ss_validate_every_n_epochs": "None",
}
MODEL_SPEC = {"modelspec.usage_hint": "Use tok1 at weight 1", "modelspec.merged_from": "a, b",
              "modelspec.preprocessor": "none", "modelspec.is_negative_embedding": "false",
              "modelspec.trigger_phrase": "tok1"}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _raw(tiny_model: Path, tiny_dataset: Path, out: Path, **overrides) -> dict:
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(out), "network_dim": 4, "network_alpha": 2.0, "log_every_n_steps": 100,
           "train_batch_size": 8, "stages": [{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]}
    return raw | overrides


@pytest.fixture(scope="module")
def settings_run(tiny_model, tiny_dataset, tmp_path_factory) -> Path:
    """One lora step with every setting above, LoCon (conv_dim 2, alpha 0.5) and a single-file VAE."""
    root = tmp_path_factory.mktemp("settings")
    shutil.copy(tiny_model / "vae" / "diffusion_pytorch_model.safetensors", root / "my_vae.safetensors")
    raw = _raw(tiny_model, tiny_dataset, root / "out", vae=str(root / "my_vae.safetensors"),
               network_args=["conv_dim=2", "conv_alpha=0.5"], **SETTINGS)
    Trainer(build_config(raw)).run()
    return root


def test_the_lora_records_the_training_settings_as_kohya_writes_them(settings_run):
    meta = _metadata(settings_run / "out" / "pti.safetensors")
    assert {k: meta.get(k) for k in KOHYA_WRITES} == KOHYA_WRITES
    # kohya writes no ss_ key for these (only modelspec.timestep_range, which pti-plugin does not write)
    assert not {"ss_min_timestep", "ss_max_timestep", "ss_v_pred_like_loss", "ss_scale_v_pred_loss_like_noise_pred"} & set(meta)
    # the keys written before stay as they were
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_lr_scheduler"]) == ("4", "2.0", "constant")


def test_the_lora_names_the_base_model_and_the_vae_as_kohya(settings_run, tiny_model):
    meta = _metadata(settings_run / "out" / "pti.safetensors")
    data = (settings_run / "my_vae.safetensors").read_bytes()
    assert {k: meta.get(k) for k in ("ss_vae_name", "ss_vae_hash", "ss_new_vae_hash")} == {
        "ss_vae_name": "my_vae.safetensors", "ss_vae_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "ss_new_vae_hash": hashlib.sha256(data).hexdigest()}
    assert {k: meta.get(k) for k in ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash")} == {
        "ss_sd_model_name": tiny_model.name, "ss_sd_model_hash": "IsADirectory", "ss_new_sd_model_hash": "IsADirectory"}


def test_a_file_past_one_mib_gets_kohyas_two_hashes(tmp_path):
    from pti_plugin.formats.kohya_lora import kohya_source_metadata

    data = bytes(range(256)) * 5000  # 1.22 MiB
    (tmp_path / "model.ckpt").write_bytes(data)
    assert kohya_source_metadata("sd_model", str(tmp_path / "model.ckpt")) == {
        "ss_sd_model_name": "model.ckpt", "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest()}
    assert kohya_source_metadata("sd_model", "@embedded") == {"ss_sd_model_name": "@embedded"}


def test_the_newer_metadata_options_are_in_the_lora_and_the_embedding(settings_run):
    for name in ("pti.safetensors", "tok1.safetensors"):
        meta = _metadata(settings_run / "out" / name)
        assert {k: meta.get(k) for k in MODEL_SPEC} == MODEL_SPEC, name
        assert "modelspec.thumbnail" not in meta


def test_a_given_trigger_phrase_replaces_the_token_and_an_empty_one_leaves_it_out(tiny_model, tiny_dataset, tmp_path):
    for phrase, expected in (("tok1 character", "tok1 character"), ("", None)):
        out = tmp_path / f"out{len(phrase)}"
        Trainer(build_config(_raw(tiny_model, tiny_dataset, out, metadata_trigger_phrase=phrase,
                                  stages=[{"kind": "inversion", "steps": 1, "learning_rate": 1e-2}]))).run()
        for name in ("pti.safetensors", "tok1.safetensors"):
            assert _metadata(out / name).get("modelspec.trigger_phrase") == expected


@pytest.mark.parametrize("key, value, message", [
    ("metadata_usage_hint", ["a"], "key 'metadata_usage_hint' expects str | None, got ['a']"),
    ("metadata_trigger_phrase", 3, "key 'metadata_trigger_phrase' expects str | None, got 3"),
    ("metadata_is_negative_embedding", True, "key 'metadata_is_negative_embedding' expects str | None, got True"),
    ("metadata_thumbnail", "thumb.png", "key 'metadata_thumbnail': cannot read the thumbnail image"),
    ("dim_from_weights", True, "key 'dim_from_weights' needs network_weights"),
    ("dim_from_weights", "yes", "key 'dim_from_weights' expects bool, got 'yes'"),
])
def test_bad_values_are_refused_naming_the_key(tiny_model, tiny_dataset, tmp_path, key, value, message):
    with pytest.raises(ConfigError) as caught:
        build_config(_raw(tiny_model, tiny_dataset, tmp_path / "out", **{key: value}))
    assert message in str(caught.value) and caught.value.key == key


def test_dim_from_weights_trains_at_the_files_dims(settings_run, tiny_model, tiny_dataset, tmp_path):
    """The settings run's LoRA is rank 4, alpha 2.0, LoCon conv rank 2, alpha 0.5; this run asks for rank 8."""
    weights = settings_run / "out" / "pti.safetensors"
    config = build_config(_raw(tiny_model, tiny_dataset, tmp_path / "out", network_weights=str(weights),
                               dim_from_weights=True, network_dim=8, network_alpha=8.0))
    assert (config.network_dim, config.network_alpha, config.network_args) == (4, 2.0, ["conv_dim=2", "conv_alpha=0.5"])
    Trainer(config).run()
    saved = toml.loads((tmp_path / "out" / "pti.config.toml").read_text())
    assert (saved["network_dim"], saved["network_alpha"], saved["network_args"]) == (4, 2.0, ["conv_dim=2", "conv_alpha=0.5"])
    meta = _metadata(tmp_path / "out" / "pti.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    with safe_open(str(tmp_path / "out" / "pti.safetensors"), "pt") as trained, safe_open(str(weights), "pt") as start:
        assert {k: trained.get_slice(k).get_shape() for k in trained.keys()} == {
            k: start.get_slice(k).get_shape() for k in start.keys()}


def test_dim_from_weights_refuses_a_file_of_several_ranks_naming_the_key(tiny_model, tiny_dataset, tmp_path):
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{}"
    tensors = {}
    for proj, rank in (("q", 2), ("k", 3)):
        tensors |= {f"{down.format(proj)}.lora_down.weight": torch.zeros(rank, 32),
                    f"{down.format(proj)}.lora_up.weight": torch.zeros(32, rank),
                    f"{down.format(proj)}.alpha": torch.tensor(1.0)}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ConfigError) as caught:
        build_config(_raw(tiny_model, tiny_dataset, tmp_path / "out", network_weights=str(tmp_path / "mixed.safetensors"),
                          dim_from_weights=True))
    assert caught.value.key == "dim_from_weights"
    assert "linear-layer LoRA modules of several ranks or alphas: rank 2 alpha 1 in 1 module(s) such as" in str(caught.value)
