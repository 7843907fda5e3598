"""kohya's ``fp8_base`` / ``fp8_base_unet``: the frozen base weights stored in float8_e4m3fn, upcast by autocast.

kohya's rule (``train_network.py``): either key asserts ``mixed_precision != "no"`` and stores the UNet in
``torch.float8_e4m3fn``; ``fp8_base`` the text encoders too, unless ``fp8_base_unet`` is also set, keeping their
``text_model.embeddings`` (token table, positions) in the mixed-precision dtype. The LoRA keeps its dtype; kohya writes
``ss_fp8_base`` and ``ss_fp8_base_unet`` (``str(bool)``). Here the normalisations hold float8's values in the
mixed-precision dtype (the CPU's autocast takes no float8 weight there), so a forward with float8 storage is the
forward of a bf16 model whose weights were rounded through float8, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import toml
import torch
from torch import nn

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.dataset_preview import main as preview_main
from pti_plugin.formats.embedding import load_embedding
from pti_plugin.formats.kohya_lora import load_lora
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.models.loading import load_base_model
from pti_plugin.models.trainable import LoraSpec, TrainableModel
from pti_plugin.trainer import Trainer

F8, BF16 = torch.float8_e4m3fn, torch.bfloat16
STAGES = [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2},
          {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]


def _bf16_autocast() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=BF16)


def _dtypes(module: nn.Module) -> dict[str, set[torch.dtype]]:
    """The dtypes of ``module``'s frozen weights by kind: linear/convolution, normalisation, embedding."""
    kinds = {"layers": (nn.Linear, nn.Conv2d), "norms": (nn.GroupNorm, nn.LayerNorm), "embeddings": (nn.Embedding,)}
    found: dict[str, set[torch.dtype]] = {kind: set() for kind in kinds}
    for name, sub in module.named_modules():
        for kind, types in kinds.items():
            if isinstance(sub, types) and ".lora_" not in name:
                found[kind] |= {p.dtype for p in sub.parameters(recurse=False)}
    return found


@register_plugin
class Fp8Probe(Plugin):
    """After every optimizer step: the dtypes of the frozen UNet and text-encoder weights and of the LoRA."""

    name = "test_fp8_probe"
    steps: list[dict] = []

    def on_step_end(self, state, logs):
        model = state.model
        Fp8Probe.steps.append({"stage": state.stage.kind, "loss": logs["loss"], "unet": _dtypes(model.unet),
                               "te": _dtypes(model.text_encoder),
                               "lora": {p.dtype for p in model.lora_parameters()}})


def _raw(tiny_model: Path, tiny_dataset: Path, out: Path, **overrides) -> dict:
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(out), "train_batch_size": 2, "log_every_n_steps": 1, "network_dim": 4, "network_alpha": 4.0,
           "mixed_precision": "bf16", "fp8_base_unet": True, "stages": STAGES, "plugins": {"test_fp8_probe": {}}}
    return raw | overrides


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_dataset, tmp_path_factory) -> dict:
    """``unet``: fp8_base_unet with bf16; ``base``: fp8_base with an inversion stage, a text-encoder LoRA, pivot
    locality and a sample; ``plain``: bf16 without the keys. Each probed."""
    root = tmp_path_factory.mktemp("fp8_base")
    prompts = root / "prompts.txt"
    prompts.write_text("tok1 --w 32 --h 32\n")
    stages_te = [STAGES[0], STAGES[1] | {"steps": 1, "train_text_encoder": True}]
    found = {}
    for name, overrides in (
        ("unet", {}),
        ("base", {"fp8_base_unet": False, "fp8_base": True, "stages": stages_te, "sample_prompts": str(prompts),
                  "sample_steps": 2, "plugins": {"test_fp8_probe": {}, "pivot_locality": {"weight": 100.0}}}),
        ("plain", {"fp8_base_unet": False}),
    ):
        raw = _raw(tiny_model, tiny_dataset, root / name, **overrides)
        Fp8Probe.steps = []
        outputs = Trainer(build_config(raw)).run()
        found[name] = {"out": root / name, "outputs": outputs, "steps": Fp8Probe.steps}
    return found


@pytest.mark.parametrize("key", ["fp8_base", "fp8_base_unet"])
def test_fp8_without_mixed_precision_is_refused_naming_both_keys(tiny_model, tiny_dataset, tmp_path, key):
    raw = _raw(tiny_model, tiny_dataset, tmp_path / "out", mixed_precision="no", fp8_base_unet=False) | {key: True}
    with pytest.raises(ConfigError) as caught:
        build_config(raw)
    assert caught.value.key == key
    assert f"key '{key}' = true needs mixed_precision = \"fp16\" or \"bf16\"" in str(caught.value)
    assert str(caught.value).endswith("got 'no'")


def test_the_dataset_preview_of_an_fp8_preset_runs(tiny_model, tiny_dataset, tmp_path, capsys):
    """The preview runs no model: the precision keys are checked for consistency only, not against this machine."""
    preset = tmp_path / "preset.toml"
    preset.write_text(toml.dumps(_raw(tiny_model, tiny_dataset, tmp_path / "out", fp8_base=True, plugins={})))
    assert preview_main(["--preset", str(preset), "--n", "1"]) == 0, capsys.readouterr().err


def test_fp8_base_unet_trains_with_the_frozen_unet_in_float8(runs):
    steps = runs["unet"]["steps"]
    assert [s["stage"] for s in steps] == ["inversion", "lora", "lora"]
    for step in steps:  # during training: the UNet's layers float8, its norms bf16; the text encoder all bf16
        assert step["unet"] == {"layers": {F8}, "norms": {BF16}, "embeddings": set()}, step["unet"]
        assert step["te"] == {"layers": {BF16}, "norms": {BF16}, "embeddings": {BF16}}, step["te"]
        assert step["lora"] == {torch.float32} and torch.isfinite(torch.tensor(step["loss"]))
    for step in runs["plain"]["steps"]:
        assert step["unet"]["layers"] == {BF16} and step["lora"] == {torch.float32}


def test_fp8_base_stores_the_text_encoder_too_but_not_its_embeddings_and_trains_the_pivot(runs):
    run = runs["base"]
    for step in run["steps"]:
        assert step["unet"]["layers"] == {F8} and step["te"] == {"layers": {F8}, "norms": {BF16}, "embeddings": {BF16}}
        assert torch.isfinite(torch.tensor(step["loss"]))
    log = [json.loads(line) for line in (run["out"] / "pti.log.jsonl").read_text().splitlines()]
    moved = [e["pivot_l2_from_init"] for e in log if e.get("stage") == "inversion0" and "pivot_l2_from_init" in e]
    assert moved and moved[-1] > 0.1  # the pivot trained, its gradient through the float8 text encoder
    vectors = load_embedding(str(run["out"] / "tok1.safetensors"), expected_dim=32, token="tok1")
    assert torch.isfinite(vectors).all()
    assert len(run["outputs"]["samples"]) == 1 and run["outputs"]["samples"][0].stat().st_size > 0
    terms = [e["loss/pivot_locality/mse"] for e in log if "loss/pivot_locality/mse" in e]
    assert terms and all(torch.isfinite(torch.tensor(t)) for t in terms)


def test_the_saved_lora_keeps_its_dtype_is_finite_and_loads(runs, tiny_model):
    from diffusers import StableDiffusionPipeline

    from pti_plugin.load_pti import load_pti

    plain, _ = load_lora(str(runs["plain"]["out"] / "pti.safetensors"))
    for name in ("unet", "base"):
        lora, metadata = load_lora(str(runs[name]["out"] / "pti.safetensors"))
        weights = {k: v for k, v in lora.items() if k.startswith("lora_")}
        assert all(torch.isfinite(v.float()).all() for v in weights.values())
        assert any(v.abs().max() > 0 for k, v in weights.items() if k.endswith("lora_up.weight"))  # trained
        unet_keys = {k: v.dtype for k, v in plain.items()}
        assert {k: v.dtype for k, v in lora.items() if k in unet_keys} == unet_keys  # same keys and dtypes as without
        expected = {"unet": ("False", "True"), "base": ("True", "False")}[name]
        assert (metadata["ss_fp8_base"], metadata["ss_fp8_base_unet"]) == expected
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, safety_checker=None)
        assert load_pti(pipe, runs[name]["out"] / "pti.safetensors") == "tok1"
    _, metadata = load_lora(str(runs["plain"]["out"] / "pti.safetensors"))
    assert (metadata["ss_fp8_base"], metadata["ss_fp8_base_unet"]) == ("False", "False")


def _model(tiny_model: Path, fp8: tuple[bool, bool] | None) -> TrainableModel:
    """The tiny model with a LoRA on the UNet and the text encoder (up weights non-zero) placed as a bf16 run
    places it: ``fp8`` (fp8_base, fp8_base_unet) through ``store_fp8``; None: every frozen weight rounded through
    float8 by hand (kohya's values: layers and norms of the UNet and the text encoder, no embedding), in bf16."""
    model = TrainableModel.build(load_base_model(str(tiny_model)), "tok1", 1, ["character"],
                                 LoraSpec(4, 4.0, text_encoders=True), seed=0)
    trainable = {id(p) for p in model.trainable_tensors().values()}
    kept = model.store_fp8(*fp8, _bf16_autocast) if fp8 else set()
    for module in model.components().values():
        for sub in module.modules():
            for param in sub.parameters(recurse=False):
                if fp8 is None and id(param) not in trainable and not isinstance(sub, nn.Embedding):
                    param.data = param.data.to(F8).to(BF16)
                elif id(param) not in trainable | kept:
                    param.data = param.data.to(BF16)
    model.use_forwards({}, _bf16_autocast)  # as a stage does
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.trainable_tensors().items():
            if ".lora_B." in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    model.set_trainable(model.pivot_parameters() + model.lora_parameters(), lora_enabled=True)
    return model


def _prediction_and_gradients(model: TrainableModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    noisy = torch.randn(2, 4, 16, 16, generator=generator)
    cond = model.encode(model.tokenize(["an anime illustration of tok1", "tok1"]))
    prediction = model.predict(noisy, torch.tensor([100, 700]), cond).float()
    prediction.pow(2).mean().backward()
    return prediction.detach(), {k: v.grad for k, v in model.trainable_tensors().items()}


def test_a_float8_forward_and_backward_is_the_bf16_one_of_the_float8_rounded_weights(tiny_model):
    """Storage in float8 changes the weights' rounding and nothing else: prediction, the pivot's gradient and
    the LoRA's are bit for bit those of the bf16 model whose weights hold float8's values."""
    reference, reference_grads = _prediction_and_gradients(_model(tiny_model, None))
    stored, stored_grads = _prediction_and_gradients(_model(tiny_model, (True, False)))
    assert torch.equal(stored, reference)
    assert stored_grads.keys() == reference_grads.keys() and stored_grads["pivot.vectors"].abs().max() > 0
    for name, grad in stored_grads.items():
        assert torch.equal(grad, reference_grads[name]), name


def test_the_float8_prediction_is_close_to_the_bf16_one(tiny_model):
    """Measured on the tiny random model (seed 0, LoRA up weights ~0.05): relative L2 error 0.083 with the UNet in
    float8, 0.085 with the text encoder too (float8 e4m3 keeps 3 mantissa bits: a weight moves by up to 1/16 of
    itself). Bounds [0.01, 0.15]: float8 must change the prediction, and not by more than about twice that."""
    bf16, _ = _prediction_and_gradients(_model(tiny_model, (False, False)))
    for fp8 in ((False, True), (True, False)):
        prediction, _ = _prediction_and_gradients(_model(tiny_model, fp8))
        error = ((prediction - bf16).norm() / bf16.norm()).item()
        assert 0.01 < error < 0.15, (fp8, error)


def test_with_both_keys_off_nothing_is_touched(tiny_model):
    model = TrainableModel.build(load_base_model(str(tiny_model)), "tok1", 1, ["character"], LoraSpec(4, 4.0), seed=0)
    before = {id(p): (p.dtype, p.detach().clone()) for m in model.components().values() for p in m.parameters()}
    assert model.store_fp8(False, False, _bf16_autocast) == set()
    after = {id(p): p for m in model.components().values() for p in m.parameters()}
    assert after.keys() == before.keys()
    assert all(p.dtype == before[i][0] and torch.equal(p, before[i][1]) for i, p in after.items())
    assert model.autocast is contextlib.nullcontext  # set from the first stage, as before
    assert not any(hasattr(m, "_ddp_params_and_buffers_to_ignore") for m in model.components().values())


# Two CPU processes train with float8 weights (DDP leaves them out of its start-up broadcast): test_multiprocess's
# test_two_processes_skip_a_non_finite_step_together_train_float8_weights_and_say_outputs_and_warnings_once (one run).
