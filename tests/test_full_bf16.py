"""kohya's ``full_bf16``: the trainable tensors (pivot, LoRA), their gradients and the optimizer state in bf16.

kohya's rule (``train_network.py``): ``full_bf16`` asserts ``mixed_precision == "bf16"`` and casts the network to
the weight dtype, bf16: no float32 copy of the trainables anywhere. Its textual inversion casts the text encoders,
with the token table being trained, the same way. The LoRA is saved in ``save_precision`` and the embedding file
float32 (as without the option); kohya writes ``ss_full_fp16`` (``False``: refused here) and no key for bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import toml
import torch
from safetensors.torch import load_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.dataset_preview import main as preview_main
from pti_plugin.formats.embedding import load_embedding
from pti_plugin.formats.kohya_lora import load_lora
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.nan_policy import NonFiniteLossError
from pti_plugin.trainer import Trainer

from .test_reliability import NanInjector
from .test_reliability_inputs import HugeLoraGradient

STAGES = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
          {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]


@register_plugin
class DtypeProbe(Plugin):
    """After every optimizer step: the dtypes of the trainable tensors and of the optimizer's state tensors."""

    name = "test_full_bf16_probe"
    steps: list[dict] = []

    def on_step_end(self, state, logs):
        optimizer_state = state.plan.optimizer.state
        DtypeProbe.steps.append({
            "stage": state.stage.kind,
            "trainable": {name: t.dtype for name, t in state.model.trainable_tensors().items()},
            "trained": {p.dtype for group in state.plan.param_groups for p in group["params"]},
            "moments": {v.dtype for s in optimizer_state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")},
        })


def _raw(tiny_model: Path, tiny_dataset: Path, out: Path, **overrides) -> dict:
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(out), "train_batch_size": 2, "log_every_n_steps": 1, "network_dim": 4, "network_alpha": 4.0,
           "mixed_precision": "bf16", "full_bf16": True, "save_precision": "bf16", "stages": STAGES}
    return raw | overrides


def _equal(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_dataset, tmp_path_factory) -> dict:
    """``bf16``: a full_bf16 run (2 inversion + 2 LoRA steps) that saves its state at step 3, probed; ``again``: the
    same run again; ``off``: mixed_precision bf16 with full_bf16 = false, probed; ``plain``: ``off`` without the key."""
    root = tmp_path_factory.mktemp("full_bf16")
    found = {}
    probed = {"plugins": {"test_full_bf16_probe": {}}}
    saving = probed | {"save_every_n_steps": 3, "save_state": True}
    for name, overrides in (("bf16", saving), ("again", saving), ("off", probed | {"full_bf16": False}), ("plain", {})):
        raw = _raw(tiny_model, tiny_dataset, root / name, **overrides)
        if name == "plain":
            del raw["full_bf16"]
        DtypeProbe.steps = []
        Trainer(build_config(raw)).run()
        found[name] = {"out": root / name, "raw": raw, "steps": DtypeProbe.steps}
    return found


def test_full_bf16_without_bf16_mixed_precision_is_refused_naming_both_keys(tiny_model, tiny_dataset, tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(_raw(tiny_model, tiny_dataset, tmp_path / "out", mixed_precision="no"))
    assert caught.value.key == "full_bf16"
    assert "key 'full_bf16' = true needs mixed_precision = \"bf16\"" in str(caught.value)
    assert str(caught.value).endswith("got 'no'")


def test_the_dataset_preview_of_a_full_bf16_preset_runs(tiny_model, tiny_dataset, tmp_path, capsys):
    """The preview runs no model: the precision keys are checked for consistency only, not against this machine."""
    preset = tmp_path / "preset.toml"
    preset.write_text(toml.dumps(_raw(tiny_model, tiny_dataset, tmp_path / "out")))
    assert preview_main(["--preset", str(preset), "--n", "1"]) == 0, capsys.readouterr().err


def test_full_fp16_stays_refused_saying_why_and_what_to_use(tiny_model, tiny_dataset, tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(_raw(tiny_model, tiny_dataset, tmp_path / "out", full_bf16=False, full_fp16=True))
    message = str(caught.value)
    assert "kohya option 'full_fp16' is not supported" in message
    assert "patched GradScaler" in message and 'use full_bf16 with mixed_precision = "bf16"' in message


def test_full_bf16_trains_the_pivot_and_the_lora_in_bf16(runs):
    steps = runs["bf16"]["steps"]
    assert [s["stage"] for s in steps] == ["inversion"] * 2 + ["lora"] * 2
    for step in steps:
        assert set(step["trainable"].values()) == {torch.bfloat16}, step["trainable"]
        assert step["trained"] == {torch.bfloat16} and step["moments"] == {torch.bfloat16}
    assert "pivot.vectors" in steps[0]["trainable"] and any(".lora_" in k for k in steps[0]["trainable"])


def test_without_full_bf16_the_trainables_stay_float32_and_nothing_changes(runs):
    for step in runs["off"]["steps"]:
        assert set(step["trainable"].values()) == {torch.float32}
        assert step["trained"] == {torch.float32} and step["moments"] == {torch.float32}
    for name in ("pti.safetensors", "tok1.safetensors"):
        assert _equal(runs["off"]["out"] / name, runs["plain"]["out"] / name), name  # full_bf16 = false: the same run
    assert not _equal(runs["bf16"]["out"] / "pti.safetensors", runs["off"]["out"] / "pti.safetensors")


def test_the_saved_files_load_and_hold_finite_values_of_the_documented_dtypes(runs):
    out = runs["bf16"]["out"]
    lora, metadata = load_lora(str(out / "pti.safetensors"))
    weights = {k: v for k, v in lora.items() if k.startswith("lora_") and k.endswith(".weight")}
    assert weights and all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in weights.values())
    assert any(v.abs().max() > 0 for k, v in weights.items() if k.endswith("lora_up.weight"))
    vectors = load_embedding(str(out / "tok1.safetensors"), expected_dim=32, token="tok1")
    assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()  # the embedding file is float32,
    assert torch.equal(vectors.to(torch.bfloat16).float(), vectors)  # holding the bf16 vectors exactly
    state = load_file(out / "pti-state-step00000003" / "trainable.safetensors")
    assert {v.dtype for v in state.values()} == {torch.bfloat16}  # the resumable state keeps them bf16
    # kohya's metadata: ss_full_fp16 (False: refused here), nothing for full_bf16
    assert metadata["ss_full_fp16"] == "False" and metadata["ss_mixed_precision"] == "bf16"
    assert not [k for k in metadata if "bf16" in k]


def test_a_full_bf16_run_is_deterministic(runs):
    for name in ("pti.safetensors", "tok1.safetensors"):
        assert _equal(runs["bf16"]["out"] / name, runs["again"]["out"] / name), name


def test_a_resumed_full_bf16_run_ends_bit_for_bit_like_the_uninterrupted_one(runs, tmp_path):
    first = runs["bf16"]
    state = first["out"] / "pti-state-step00000003"  # in the LoRA stage: its bf16 Adam moments reload
    Trainer(build_config(first["raw"] | {"output_dir": str(tmp_path / "resumed"), "resume": str(state), "plugins": {}})).run()
    for name in ("pti.safetensors", "tok1.safetensors"):
        assert _equal(tmp_path / "resumed" / name, first["out"] / name), name


def test_pivot_locality_regularises_a_bf16_lora(tiny_model, tiny_dataset, tmp_path):
    raw = _raw(tiny_model, tiny_dataset, tmp_path / "out", plugins={"pivot_locality": {"weight": 100.0}},
               stages=[STAGES[0] | {"steps": 1}, STAGES[1]])
    Trainer(build_config(raw)).run()
    log = [json.loads(line) for line in (tmp_path / "out" / "pti.log.jsonl").read_text().splitlines()]
    terms = [e["loss/pivot_locality/mse"] for e in log if "loss/pivot_locality/mse" in e]
    assert len(terms) == 2 and terms[-1] > 1e-6 and all(torch.isfinite(torch.tensor(t)) for t in terms)


def test_a_non_finite_bf16_gradient_is_skipped_under_clipping(tiny_model, tiny_dataset, tmp_path):
    NanInjector.pivots = []
    raw = _raw(tiny_model, tiny_dataset, tmp_path / "out", nan_policy="skip", max_grad_norm=1.0,
               plugins={"test_inf_gradient": {"at_step": 2}}, stages=[STAGES[0] | {"steps": 3}])
    Trainer(build_config(raw)).run()
    pivots = NanInjector.pivots
    assert len(pivots) == 3 and all(p.dtype == torch.bfloat16 for p in pivots)
    assert torch.equal(pivots[1], pivots[0]) and not torch.equal(pivots[2], pivots[1])  # step 2 skipped
    assert torch.isfinite(pivots[-1].float()).all()


def test_the_weight_guard_keeps_the_last_finite_bf16_weights(tiny_model, tiny_dataset, tmp_path):
    HugeLoraGradient.before = []
    raw = _raw(tiny_model, tiny_dataset, tmp_path / "out", max_grad_norm=0.0, plugins={"test_huge_lora_gradient": {}},
               stages=[STAGES[0] | {"steps": 1}, {"kind": "lora", "steps": 2, "learning_rate": 100.0, "optimizer_type": "SGD"}])
    with pytest.raises(NonFiniteLossError, match=r"the weights became non-finite in the optimizer step at stage 1"):
        Trainer(build_config(raw)).run()
    kept = HugeLoraGradient.before[-1]  # the LoRA-up weights before the failing step, bf16
    assert kept and all(v.dtype == torch.bfloat16 for v in kept.values())
    state = load_file(tmp_path / "out" / "pti-state-interrupted-step00000001" / "trainable.safetensors")
    assert all(torch.equal(state[f"unet.{n}"], kept[n]) for n in kept)
