"""kohya's ``no_metadata``: the LoRA keeps kohya's minimum metadata (``SS_METADATA_MINIMUM_KEYS``: the base model
version, the network module, dim, alpha and network args when any) the SAI model spec and the weights' ``sshs_*`` hashes (kohya's save adds them to any metadata), nothing else; the
weights and the embedding file are those of a run without the option."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def test_no_metadata_keeps_kohyas_minimum_keys_and_the_model_spec_only(preset, tmp_path):
    stages = [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 1, "learning_rate": 1e-2}]
    common = dict(stages=stages, training_comment="secret dataset", network_args=["conv_dim=4", "conv_alpha=2"])
    Trainer(build_config(preset(output_dir=str(tmp_path / "bare"), no_metadata=True, **common))).run()
    Trainer(build_config(preset(output_dir=str(tmp_path / "full"), **common))).run()
    bare, full = _metadata(tmp_path / "bare" / "pti.safetensors"), _metadata(tmp_path / "full" / "pti.safetensors")
    spec = {k for k in full if k.startswith("modelspec.")}
    hashes = {k for k in full if k.startswith("sshs_")}  # the weights' hashes, which kohya's save adds to any metadata
    assert spec and {"ss_tag_frequency", "ss_training_comment", "pti_stages", "ss_steps"} <= full.keys()
    assert bare.keys() == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                           "ss_network_args"} | spec | hashes
    assert (bare["ss_network_dim"], bare["ss_network_alpha"], bare["ss_network_module"]) == (
        full["ss_network_dim"], full["ss_network_alpha"], "networks.lora")
    assert bare["ss_network_args"] == full["ss_network_args"]
    assert {k: bare[k] for k in spec if k != "modelspec.date"} == {k: full[k] for k in spec if k != "modelspec.date"}
    for name in ("pti.safetensors", "tok1.safetensors"):  # same weights, same bundled and standalone pivot
        a, b = load_file(str(tmp_path / "bare" / name)), load_file(str(tmp_path / "full" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metadata(tmp_path / "bare" / "tok1.safetensors").keys() == _metadata(tmp_path / "full" / "tok1.safetensors").keys()
