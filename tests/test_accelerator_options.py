"""kohya's accelerator options: ``torch_compile`` with ``dynamo_backend``, ``ddp_timeout``,
``ddp_gradient_as_bucket_view`` and ``ddp_static_graph`` (kohya's ``train_util.prepare_accelerator``).

The compiled run uses the "eager" backend (dynamo captures the graphs and runs them eagerly): inductor builds C++
on the CPU and takes minutes on the tiny model."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from pathlib import Path

import pytest
import toml
import torch
from safetensors.torch import load_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config, load_config
from pti_plugin.trainer import Trainer

STAGES = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
          {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]


def _trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "pti.safetensors") | {"emb:" + k: v for k, v in load_file(out / "tok1.safetensors").items()}


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_dataset, tmp_path_factory):
    """``plain``: two inversion and two LoRA steps (UNet and text-encoder LoRA) with pivot locality and samples at
    global step 3 (in the LoRA stage) and at the end, float saves; ``compiled``: the same with torch_compile = true,
    dynamo_backend = "eager" and the DDP options. Each with the classes of the modules torch.compile was given,
    whether gradients were on at each call of a compiled module, and the trainer's accelerator."""
    root = tmp_path_factory.mktemp("accelerator_options")
    prompts = root / "prompts.txt"
    prompts.write_text("tok1 --w 32 --h 32 --d 5\n")
    found = {}
    compile_original = torch.compile
    for name, options in (("plain", {}), ("compiled", {"torch_compile": True, "dynamo_backend": "eager", "ddp_timeout": 7,
                                                         "ddp_gradient_as_bucket_view": True, "ddp_static_graph": True})):
        raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
               "output_dir": str(root / name), "train_batch_size": 2, "log_every_n_steps": 1, "network_dim": 4,
               "network_alpha": 4.0, "save_precision": "float", "network_train_unet_only": False,
               "plugins": {"pivot_locality": {"weight": 100.0}}, "sample_prompts": str(prompts), "sample_steps": 1,
               "sample_every_n_steps": 3, "stages": STAGES} | options
        compiled: list[str] = []
        grad_at_calls: list[bool] = []

        def recording(model, *args, **kwargs):
            compiled.append(type(model).__name__)
            result = compile_original(model, *args, **kwargs)
            result.register_forward_pre_hook(lambda module, inputs: grad_at_calls.append(torch.is_grad_enabled()))
            return result

        torch.compile = recording
        try:
            trainer = Trainer(build_config(raw))
            trainer.run()
        finally:
            torch.compile = compile_original
            torch._dynamo.reset()
        found[name] = {"out": root / name, "compiled": compiled, "grad_at_calls": grad_at_calls,
                       "accelerator": trainer.accelerator,
                       "backend": trainer.accelerator.state.dynamo_plugin.backend}  # the state is the process's
    return found


def test_torch_compile_compiles_the_modules_each_stage_trains_and_trains_the_same(runs):
    """Inversion: the text encoder (the pivot trains in it); LoRA: the UNet and the text encoder (their LoRA). The
    eager backend runs the captured graphs with the same kernels: the LoRA and the embedding equal the plain
    run's bit for bit (measured: a largest difference of 0)."""
    assert runs["plain"]["compiled"] == []
    assert sorted(runs["compiled"]["compiled"]) == ["CLIPTextModel", "CLIPTextModel", "UNet2DConditionModel"]
    plain, compiled = _trained(runs["plain"]["out"]), _trained(runs["compiled"]["out"])
    assert plain.keys() == compiled.keys()
    assert any(k.startswith("lora_te_") for k in plain) and any(k.startswith("lora_unet_") for k in plain)
    assert any(float(v.abs().max()) > 0 for k, v in plain.items() if k.endswith("lora_up.weight"))
    diff = max(float((plain[k] - compiled[k]).abs().max()) for k in plain)
    print(f"largest difference compiled - plain: {diff}")
    assert diff == 0.0
    losses = [[json.loads(line)["loss"] for line in (run["out"] / "pti.log.jsonl").read_text().splitlines()]
              for run in (runs["plain"], runs["compiled"])]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_the_frozen_forward_and_sampling_run_the_plain_modules(runs):
    """Pivot locality's frozen forward and the samples run without gradients, through the plain modules: a compiled
    module is only ever called with gradients on, and the locality term and the samples equal the plain run's."""
    calls = runs["compiled"]["grad_at_calls"]
    assert calls and all(calls)
    logs = [[json.loads(line) for line in (run["out"] / "pti.log.jsonl").read_text().splitlines()]
            for run in (runs["plain"], runs["compiled"])]
    terms = [[e.get("loss/pivot_locality/mse") for e in log] for log in logs]
    assert terms[0] == terms[1] and terms[0][2] is not None and terms[0][2] > 0
    samples = [sorted((run["out"] / "samples").glob("pti-step*.png")) for run in (runs["plain"], runs["compiled"])]
    assert [p.name for p in samples[0]] == [p.name for p in samples[1]] and any("step00000003" in p.name for p in samples[0])
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*samples))


def test_the_options_reach_accelerate(runs):
    """kohya's Accelerator arguments: the backend, the process-group timeout in minutes and DDP's two flags; none
    of them when the options are off (accelerate's own settings, as before)."""
    from accelerate.utils import DynamoBackend

    compiled, plain = runs["compiled"]["accelerator"], runs["plain"]["accelerator"]
    assert runs["compiled"]["backend"] == DynamoBackend.EAGER
    assert compiled.init_handler.timeout == datetime.timedelta(minutes=7)
    assert (compiled.ddp_handler.gradient_as_bucket_view, compiled.ddp_handler.static_graph) == (True, True)
    assert runs["plain"]["backend"] == DynamoBackend.NO
    assert plain.init_handler is None and plain.ddp_handler is None


def test_one_ddp_flag_alone_and_a_zero_timeout(preset, tmp_path):
    """kohya: DDP's kwargs when either flag is set (the other False); ``ddp_timeout = 0`` is accelerate's default
    (kohya's ``if args.ddp_timeout``)."""
    trainer = Trainer(build_config(preset(ddp_static_graph=True, ddp_timeout=0, stages=[{"kind": "inversion", "steps": 1}])))
    trainer.run()
    handler = trainer.accelerator.ddp_handler
    assert (handler.gradient_as_bucket_view, handler.static_graph) == (False, True)
    assert trainer.accelerator.init_handler is None


@pytest.mark.parametrize("options, key, message", [
    ({"dynamo_backend": "fast"}, "dynamo_backend", "must be one of"),
    ({"torch_compile": True, "dynamo_backend": "fast"}, "dynamo_backend", "must be one of"),
    ({"ddp_timeout": -5}, "ddp_timeout", "must be >= 0"),
    ({"torch_compile": True, "dynamo_backend": "no"}, "torch_compile", "compiles nothing"),
    ({"torch_compile": True, "dynamo_backend": "tensort"}, "dynamo_backend", "accelerate has no such backend"),
    ({"torch_compile": True, "dynamo_backend": "ofi"}, "dynamo_backend", "this PyTorch has no such backend"),
])
def test_a_bad_option_is_refused_at_start_naming_its_key(preset, options, key, message):
    with pytest.raises(ConfigError, match=f"key '{key}'.*{message}"):
        build_config(preset(**options))


def test_a_backend_without_torch_compile_is_unused_with_a_warning_naming_both(preset, caplog):
    with caplog.at_level(logging.WARNING):
        build_config(preset(dynamo_backend="eager"))
        assert "dynamo_backend = 'eager' is unused without torch_compile = true" in caplog.text
        caplog.clear()
        for quiet in ({"dynamo_backend": "inductor"}, {"dynamo_backend": "no"}, {"torch_compile": True, "dynamo_backend": "eager"}):
            build_config(preset(**quiet))
    assert "dynamo_backend" not in caplog.text


def test_a_kohya_config_file_with_these_options_loads(tmp_path):
    """kohya's --output_config writes them under its sections; before, each was refused as not implemented."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "kohya.toml").write_text('[training]\ntorch_compile = true\ndynamo_backend = "eager"\nddp_timeout = 30\n'
                                         'ddp_gradient_as_bucket_view = true\nddp_static_graph = true\n')
    (tmp_path / "p.toml").write_text('config_file = "kohya.toml"\ntrain_data_dir = "imgs"\n')
    config = load_config(tmp_path / "p.toml")
    assert (config.torch_compile, config.dynamo_backend, config.ddp_timeout) == (True, "eager", 30)
    assert config.ddp_gradient_as_bucket_view and config.ddp_static_graph


def test_two_processes_with_the_ddp_options_match_one_process_and_their_state_resumed_by_one_warns_naming_both_batches(
        preset, tiny_dataset, tmp_path, caplog):
    """A two-process CPU run (torchrun, gloo) with ddp_timeout, ddp_gradient_as_bucket_view and ddp_static_graph
    (both stages: the text encoder, then the UNet and text-encoder LoRA DDP-wrapped with them) gives what one
    process gives at the same global batch, as without the options (test_multiprocess).

    The same run (batch 1: global batch 2, the latents cached to disk) saves a state at step 2 of 3; one process
    resumes it: warned, naming both global batches and process counts (before: silent), it continues at step 1 of
    stage 1 as kohya's resume does and trains step 3 alone. The 2-process run wrote each latent cache file (4 images,
    no flip)."""
    import shutil

    from .test_multiprocess import REPO, _run as run_command

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)  # the latent cache is written beside the images
    raw = preset(save_precision="float", max_grad_norm=0.0, train_batch_size=1, optimizer_type="SGD",
                 network_train_unet_only=False, ddp_timeout=5, ddp_gradient_as_bucket_view=True, ddp_static_graph=True,
                 train_data_dir=str(data), cache_latents_to_disk=True, save_state=True, save_every_n_steps=2,
                 stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 1},
                         {"name": "lora", "kind": "lora", "learning_rate": 0.1, "steps": 2}])
    raw.pop("output_dir")
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "p.toml").write_text(toml.dumps(raw))
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_pti.py"),
                 "--preset", "p.toml", "--output_dir", "two"], tmp_path)
    assert len(list(data.rglob("*.pti_latents.safetensors"))) == 4
    # one process, in this one, at the same global batch (the latents read from the same cache)
    Trainer(build_config(raw | {"output_dir": str(tmp_path / "one"), "train_batch_size": 2, "save_state": False})).run()
    one, two = _trained(tmp_path / "one"), _trained(tmp_path / "two")
    assert one.keys() == two.keys() and any(k.startswith("lora_te_") for k in one)
    moved = max(float(one[k].abs().max()) for k in one if k.endswith("lora_up.weight"))
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"largest LoRA up weight {moved:.3g}, largest difference {diff:.3g}")
    assert moved > 1e-4 and diff < 1e-4 * moved

    state = tmp_path / "two" / "pti-state-step00000002"
    assert json.loads((state / "progress.json").read_text())["batch"] == {
        "processes": 2, "train_batch_size": 1, "gradient_accumulation_steps": 1}
    with caplog.at_level(logging.WARNING):
        Trainer(build_config(raw | {"output_dir": str(tmp_path / "resumed"), "resume": str(state)})).run()
    assert (f"state {state} was saved by a run of global batch 2 (2 process(es) x train_batch_size 1 x "
            "gradient_accumulation_steps 1); this run's is 1 (1 process(es) x train_batch_size 1 x "
            "gradient_accumulation_steps 1). It continues at step 1 of stage 1") in caplog.text
    log = [json.loads(line) for line in (tmp_path / "resumed" / "pti.log.jsonl").read_text().splitlines()]
    assert [entry["global_step"] for entry in log] == [3]
