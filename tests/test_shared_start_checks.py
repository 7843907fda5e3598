"""Start-up checks shared between keys: the LoRA files of ``network_weights`` and ``base_weights`` get the same
checks and messages; a resume's pickles are checked with their tensors mapped from the file, not read;
``lr_scheduler_timescale`` > 0 at the top level and in a stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.safe_load import UnsafeFileError, safe_torch_load

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32 of the tiny model


def _lora_files(folder: Path) -> list[tuple[Path, str]]:
    """Broken LoRA files, each with the message (after ``key '<key>'``) both keys give, written out by hand."""
    save_file({"bundle_emb.tok1.string_to_param.*": torch.zeros(1, 32)}, str(folder / "only_emb.safetensors"))
    save_file({f"{Q}.lora_down.weight": torch.full((2, 32), float("nan")), f"{Q}.lora_up.weight": torch.zeros(32, 2)},
              str(folder / "nan.safetensors"))
    (folder / "short.safetensors").write_bytes(b"\x05\x00")
    save_file({"emb_params": torch.zeros(1, 32)}, str(folder / "emb.safetensors"))
    return [
        (folder / "only_emb.safetensors",
         f": {folder / 'only_emb.safetensors'} holds no LoRA tensors (no lora_down/lora_up/alpha key)"),
        (folder / "nan.safetensors",
         f": {folder / 'nan.safetensors'} holds non-finite values (NaN or inf) in tensor '{Q}.lora_down.weight'; it "
         "cannot start a run"),
        (folder / "short.safetensors", f": {folder / 'short.safetensors'}: truncated safetensors file (2 bytes, no header)"),
        (folder / "emb.safetensors",
         f": {folder / 'emb.safetensors'} is not a kohya LoRA: key 'emb_params' (1 in all) does not end in "
         ".lora_down.weight, .lora_up.weight, .alpha"),
    ]


def test_network_weights_and_base_weights_refuse_the_same_bad_lora_files_with_the_same_message(preset, tmp_path):
    """Before: network_weights said only 'holds no LoRA tensors', base_weights named a truncated file twice and
    left out 'it cannot start a run'."""
    for path, message in _lora_files(tmp_path):
        for key, value in (("network_weights", str(path)), ("base_weights", [str(path)])):
            with pytest.raises(ConfigError) as error:
                build_config(preset(**{key: value}))
            assert str(error.value) == f"preset: key '{key}'{message}", (key, path.name)


def test_safe_torch_load_can_map_the_tensors_of_a_zip_file_and_reads_a_legacy_file_whole(tmp_path):
    state = {"step": 3, "exp_avg": torch.arange(12.0).reshape(3, 4), "names": ["a", "b"]}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch cannot map this one
    for name in ("zip.pt", "legacy.pt"):
        loaded = safe_torch_load(tmp_path / name, mmap=True)
        assert loaded["step"] == 3 and loaded["names"] == ["a", "b"]
        assert torch.equal(loaded["exp_avg"], torch.arange(12.0).reshape(3, 4))

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"state": {}, "payload": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(UnsafeFileError, match="refused to load"):
        safe_torch_load(tmp_path / "unsafe.pt", mmap=True)


def test_the_resume_start_up_check_maps_the_optimizer_and_scheduler_tensors(preset, tmp_path, monkeypatch):
    """Before: the check read optimizer.pt and lr_scheduler.pt whole, and the resume read them again once the model
    loaded; now the check maps their tensors (reads the pickles only)."""
    import pti_plugin.safe_load as safe_load
    from pti_plugin.resume import save_state

    optimizer = {"state": {0: {"exp_avg": torch.ones(1, 32)}}, "param_groups": [{"lr": 1e-3, "params": [0], "name": "pivot"}]}
    state = save_state(tmp_path / "pti-state-step00000001", {"pivot.vectors": torch.zeros(1, 32)}, optimizer,
                       {"last_epoch": 1}, 0, 1, 1, stage_kind="inversion", optimizer_type="AdamW",
                       param_groups=[("pivot", 1)], token_string="tok1")
    calls = []
    real_load = torch.load

    def spy(path, *args, **kwargs):
        calls.append((Path(path).name, kwargs.get("mmap", False)))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(safe_load.torch, "load", spy)
    build_config(preset(resume=str(state), stages=[{"kind": "inversion", "steps": 2}]))
    assert sorted(calls) == [("lr_scheduler.pt", True), ("optimizer.pt", True)]


@pytest.mark.parametrize("where, value, message", [
    ({}, 0, "key 'lr_scheduler_timescale' must be > 0, got 0"),
    ({"stage": 0}, -1, "key 'stages.0.lr_scheduler_timescale' must be > 0, got -1"),
])
def test_lr_scheduler_timescale_must_be_positive_at_the_top_and_in_a_stage(preset, where, value, message):
    """A pin for the refactor: the check moved to the keys that are unset or > 0, its message unchanged."""
    if where:
        keys = {"lr_scheduler": "inverse_sqrt", "stages": [{"kind": "inversion", "steps": 2, "lr_scheduler_timescale": value}]}
    else:
        keys = {"lr_scheduler": "inverse_sqrt", "lr_scheduler_timescale": value}
    with pytest.raises(ConfigError, match=f"^preset: {message}$"):
        build_config(preset(**keys))
