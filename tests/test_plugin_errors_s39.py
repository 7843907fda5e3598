"""A plugin's error during training (audit s39, findings 2, 5, 6): a hook that raises, or hands back loss terms or UNet
rows the contract does not allow, stops the run with a message naming the plugin, the hook and the step, and the last
finished step's files and state are saved (as a non-finite loss saves them); log and metadata entries that break
the contract are dropped with a warning naming the plugin, and the run and its files go on."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import toml
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pti_plugin.cli import main
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, UNetRows, register_plugin
from pti_plugin.models.family import Conditioning
from pti_plugin.plugin_calls import PluginCalls, PluginError, rows_problem
from pti_plugin.plugins.staged_schedule import StagedSchedule
from pti_plugin.trainer import Trainer


def _bad_value(kind: str, batch) -> object:
    """What a careless plugin hands back (``kind``), for the step's ``batch``."""
    shape = tuple(batch.latents.shape[1:])
    if kind == "float":
        return {"term": 0.5}
    if kind == "three_channels":  # UNet rows with 3 latent channels where the model has 4
        return UNetRows(torch.zeros(1, 3, *shape[1:]), batch.timesteps[:1], None)
    raise AssertionError(kind)


@register_plugin
class Faulty(Plugin):
    """Fails in ``fail_in`` at global step ``at_step`` (1-based; micro-batch ``at_micro``): raises, or hands back
    ``returns``; records the trainable tensors after each step."""

    name = "test_p2_faulty"
    after_step: dict[int, dict[str, torch.Tensor]] = {}

    @dataclass
    class Options:
        fail_in: str = ""
        at_step: int = 1
        at_micro: int = 1
        returns: str = ""

    def _failing(self, state, hook: str) -> bool:
        if hook != self.options.fail_in or state.global_step + 1 != self.options.at_step:
            return False
        self._micro = getattr(self, "_micro", 0) + 1
        return self._micro == self.options.at_micro

    def _fail(self, hook: str):
        raise ValueError(f"test_p2_faulty broke in {hook}")

    def on_setup(self, state):
        if self.options.fail_in == "on_setup":
            self._fail("on_setup")

    def extra_rows(self, state, batch):
        if self._failing(state, "extra_rows"):
            return _bad_value(self.options.returns, batch)
        return None

    def extra_losses(self, state, batch, main, rows):
        if self._failing(state, "extra_losses"):
            if self.options.returns:
                return _bad_value(self.options.returns, batch)
            self._fail("extra_losses")
        return {}

    def on_step_end(self, state, logs):
        Faulty.after_step[state.global_step] = {k: v.detach().clone() for k, v in state.model.trainable_tensors().items()}
        if self.options.fail_in == "on_step_end" and state.global_step == self.options.at_step:
            self._fail("on_step_end")


@register_plugin
class FaultySchedule(StagedSchedule):
    """The built-in schedule, except that its plan of stage ``at_stage`` raises."""

    name = "test_p2_schedule"

    @dataclass
    class Options:
        at_stage: int = 1

    def plan_stage(self, state, stage):
        if stage.index == self.options.at_stage:
            raise KeyError("test_p2_schedule has no plan for this stage")
        return super().plan_stage(state, stage)


TWO_STAGES = [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 1, "learning_rate": 1e-2}]


def _state_files(out: Path, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The interrupted state of ``step`` (its progress and trainable tensors); the LoRA and embedding beside it."""
    state = out / f"pti-state-interrupted-step{step:08d}"
    assert (out / f"pti-interrupted-step{step:08d}.safetensors").is_file()
    assert (out / f"tok1-interrupted-step{step:08d}.safetensors").is_file()
    return json.loads((state / "progress.json").read_text()), load_file(state / "trainable.safetensors")


def test_a_hook_raising_mid_step_names_the_plugin_and_keeps_the_last_finished_step(preset, tmp_path, capsys):
    """Audit: raising in a hook in the LoRA stage gave a traceback and exit 1, and the folder held only config.toml
    and the log. The run stops with exit 5, the plugin's own frames above a line naming the plugin, the hook and
    the step, and the last finished step's LoRA, embedding and state are saved with the command that resumes them;
    the failure in the 2nd micro-batch of an accumulated step saves the weights and optimizer of the step before."""
    Faulty.after_step = {}
    raw = preset(stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 2}],
                 gradient_accumulation_steps=2, train_batch_size=1,
                 plugins={"test_p2_faulty": {"fail_in": "extra_losses", "at_step": 3, "at_micro": 2}})
    path = tmp_path / "preset.toml"
    path.write_text(toml.dumps(raw))
    code = main(["--preset", str(path)])
    err = capsys.readouterr().err
    assert code == 5
    tail = err[err.index("Traceback (most recent call last)"):]
    assert re.search(r'File ".*test_plugin_errors_s39.py", line \d+, in extra_losses', tail)  # the plugin's frames,
    assert "trainer.py" not in tail and "plugin_calls.py" not in tail  # not the trainer's
    assert ("error: plugin 'test_p2_faulty' failed in extra_losses at stage 1 ('lora1'), step 2 (global step 3): "
            "ValueError: test_p2_faulty broke in extra_losses\nsaved pti-interrupted-step00000002.safetensors, "
            "tok1-interrupted-step00000002.safetensors and the state ") in tail
    assert re.search(r"\nresume with: .*--resume .*pti-state-interrupted-step00000002\n?$", tail)
    out = Path(raw["output_dir"])
    progress, trainable = _state_files(out, 2)
    assert (progress["stage_index"], progress["stage_step"], progress["global_step"]) == (1, 1, 2)
    assert trainable.keys() == Faulty.after_step[2].keys()
    assert all(torch.equal(trainable[k], Faulty.after_step[2][k]) for k in trainable)  # the weights after step 2
    optimizer = torch.load(out / "pti-state-interrupted-step00000002" / "optimizer.pt", weights_only=False)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {1}  # the LoRA stage's one finished step
    assert not (out / "pti.safetensors").exists()


@pytest.mark.parametrize("plugins, stopped, saved", [
    # the schedule's plan of the 2nd stage: the state is the 1st stage's end (its plan and optimizer)
    ({"test_p2_schedule": {"at_stage": 1}},
     "plugin 'test_p2_schedule' failed in plan_stage at the start of stage 1 ('lora1'): KeyError", (0, 1, 1)),
    # after the optimizer step: the step counts
    ({"test_p2_faulty": {"fail_in": "on_step_end", "at_step": 2}},
     "plugin 'test_p2_faulty' failed in on_step_end after stage 1 ('lora1'), step 1 (global step 2): ValueError", (1, 1, 2)),
    # before any step: nothing to save
    ({"test_p2_faulty": {"fail_in": "on_setup"}},
     "plugin 'test_p2_faulty' failed in on_setup during the set-up, before the first step: ValueError", None),
    # audit: "Sizes of tensors must match" from inside the UNet call
    ({"test_p2_faulty": {"fail_in": "extra_rows", "at_step": 2, "returns": "three_channels"}},
     "plugin 'test_p2_faulty''s extra_rows at stage 1 ('lora1'), step 1 (global step 2) returned noisy_latents as a "
     "tensor of shape [1, 3, 16, 16], float32, on cpu; expected shape [1, 4, 16, 16], float32 on cpu", (1, 0, 1)),
    # audit: "'float' object has no attribute 'detach'" after the backward
    ({"test_p2_faulty": {"fail_in": "extra_losses", "at_step": 2, "returns": "float"}},
     "plugin 'test_p2_faulty''s extra_losses at stage 1 ('lora1'), step 1 (global step 2) returned the loss term "
     "'term' as a float (0.5): a term must be a 0-dim floating tensor on cpu", (1, 0, 1)),
], ids=["plan_stage", "on_step_end", "on_setup", "extra_rows", "extra_losses"])
def test_each_hook_s_error_names_it_and_saves_the_last_finished_step(plugins, stopped, saved, preset):
    raw = preset(stages=TWO_STAGES, plugins=plugins)
    with pytest.raises(PluginError) as error:
        Trainer(build_config(raw)).run()
    assert str(error.value).startswith(stopped), str(error.value)
    out = Path(raw["output_dir"])
    if saved is None:
        assert str(error.value).endswith("\nnothing saved: no training step finished since the start")
        assert not list(out.glob("*.safetensors")) and not list(out.glob("pti-state-*"))
        return
    progress, _ = _state_files(out, saved[2])
    assert (progress["stage_index"], progress["stage_step"], progress["global_step"]) == saved
    assert "\nresume with: " in str(error.value)


@register_plugin
class Careless(Plugin):
    """Logs and saves what the contract does not allow, beside entries that are fine."""

    name = "test_p2_careless"

    def on_step_end(self, state, logs):
        state.logs["test_p2_careless/tensor"] = torch.tensor(2.5)  # converted
        state.logs["test_p2_careless/text"] = "hello"  # dropped
        state.logs["loss"] = -1.0  # the trainer's: not logged
        state.metadata["a1_note"] = "not pti_"  # dropped

    def on_before_save(self, state, files):
        files["metadata"]["pti_careless_ok"] = "kept"
        files["metadata"]["pti_careless_int"] = 3
        files["metadata"]["pti_token_string"] = "someone else"
        files["metadata"]["pti_inversion_learning_rate"] = "0.5"


@register_plugin
class Crashing(Plugin):
    name = "test_p2_crashing"

    def on_before_save(self, state, files):
        files["metadata"]["pti_crashing"] = "half-written"
        raise RuntimeError("no metadata today")


def test_bad_log_and_metadata_entries_are_dropped_naming_the_plugin_and_the_files_are_written(preset, caplog):
    """Audit: a tensor in state.logs stopped the run at its first logged step ("not JSON serializable"); state.logs
    ["loss"] replaced the logged loss; a metadata key without pti_ or an int value stopped the final save, and
    pti_token_string replaced the trainer's own. Each is now dropped (or converted) with a warning naming the
    plugin; the run finishes and writes its files."""
    raw = preset(stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}],
                 plugins={"test_p2_careless": {}, "test_p2_crashing": {}})
    with caplog.at_level(logging.WARNING):
        Trainer(build_config(raw)).run()
    out = Path(raw["output_dir"])
    log = [json.loads(line) for line in (out / "pti.log.jsonl").read_text().splitlines()]
    assert [e["test_p2_careless/tensor"] for e in log] == [2.5, 2.5]
    assert all("test_p2_careless/text" not in e and e["loss"] == e["loss/main"] > 0 for e in log)
    with safe_open(out / "pti.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["pti_careless_ok"] == "kept" and meta["pti_token_string"] == "tok1"
    assert meta["pti_inversion_learning_rate"] == "0.05"
    assert not {"a1_note", "pti_careless_int", "pti_crashing"} & meta.keys()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "plugin '" in r.getMessage()]
    for said in ("plugin 'test_p2_careless' (on_step_end): state.logs['test_p2_careless/text'] = a str ('hello')",
                 "plugin 'test_p2_careless' (state.logs): 'loss' is one of the trainer's own log keys",
                 "plugin 'test_p2_careless' (on_step_end): state.metadata['a1_note']",
                 "plugin 'test_p2_careless' (on_before_save): files[\"metadata\"]['pti_careless_int']",
                 "plugin 'test_p2_careless' (on_before_save): files[\"metadata\"]['pti_token_string']: one of the trainer's",
                 "plugin 'test_p2_careless' (on_before_save): files[\"metadata\"]['pti_inversion_learning_rate']: one of",
                 "plugin 'test_p2_crashing' (on_before_save): raised RuntimeError: no metadata today"):
        assert any(w.startswith(said) for w in warnings), said
    assert sum("test_p2_careless/text" in w for w in warnings) == 1  # once, though it comes back every step


# ----------------------------------------------------------------------------- the checks alone

def _calls(plugins) -> PluginCalls:
    stage = SimpleNamespace(name="lora1")
    return PluginCalls(plugins, SimpleNamespace(stage=stage, stage_index=1, stage_step=0, global_step=4, logs={}, metadata={}))


class _Returns(Plugin):
    name = "returns"

    def __init__(self, value):
        self.value = value

    def extra_losses(self, state, batch, main, rows):
        return self.value


@pytest.mark.parametrize("returned, said", [
    ({"t": torch.zeros(2, 4, 4, 4, requires_grad=True)}, "'t' as a tensor of shape [2, 4, 4, 4], float32, on cpu: a term "
     "must be a 0-dim floating tensor on cpu"),  # audit: "grad can be implicitly created only for scalar outputs"
    ({"t": torch.zeros(1)}, "'t' as a tensor of shape [1], float32"),  # audit: "stack expects each tensor to be equal size"
    ({"t": torch.zeros((), device="meta")}, "'t' as a tensor of shape [], float32, on meta"),  # "Cannot copy out of meta"
    ({"t": torch.tensor(1)}, "'t' as a tensor of shape [], int64"),
    ({"": torch.zeros(())}, "a loss term named '': a term's name must be a non-empty string"),
    ([torch.zeros(())], "a list ([tensor(0.)]), not a dict of loss terms"),
])
def test_extra_losses_must_be_named_0_dim_floating_tensors_on_the_main_loss_s_device(returned, said):
    terms = {"main": torch.zeros(())}
    with pytest.raises(PluginError, match=re.escape(said)) as error:
        _calls([_Returns(returned)]).losses(terms, None, None, {})
    assert str(error.value).startswith("plugin 'returns''s extra_losses at stage 1 ('lora1'), step 1 (global step 5) returned ")
    good = {"main": torch.zeros(())}
    _calls([_Returns({"t": torch.ones((), dtype=torch.float64)})]).losses(good, None, None, {})
    assert list(good) == ["main", "returns/t"]
    with pytest.raises(PluginError, match="the step has a term 'returns/t' already"):
        _calls([_Returns({"t": torch.ones(())})]).losses(good, None, None, {})


def _main_rows(b=2):
    return (torch.zeros(b, 4, 8, 8), torch.zeros(b, dtype=torch.long),
            Conditioning(torch.zeros(b, 77, 32), {"time_ids": torch.zeros(b, 6)}))


@pytest.mark.parametrize("change, said", [
    ({"noisy": torch.zeros(1, 4, 8, 8, dtype=torch.float64)}, "noisy_latents as a tensor of shape [1, 4, 8, 8], float64, "
     "on cpu; expected shape [1, 4, 8, 8], float32 on cpu"),  # audit: a dtype mismatch inside the UNet
    ({"t": torch.zeros(3, dtype=torch.long)}, "timesteps as a tensor of shape [3], int64, on cpu; expected shape [1]"),
    ({"hidden": torch.zeros(2, 77, 32)}, "conditioning.hidden_states as a tensor of shape [2, 77, 32]"),
    ({"hidden": torch.zeros(1, 77, 16)}, "expected shape [1, 77, 32]"),
    ({"extra": {}}, "a conditioning with added_cond_kwargs keys []; expected keys ['time_ids']"),
    ({"extra": {"time_ids": torch.zeros(1, 6, dtype=torch.float16)}}, "conditioning.added_cond_kwargs['time_ids'] as a "
     "tensor of shape [1, 6], float16, on cpu; expected shape [1, 6], float32"),
])
def test_extra_rows_must_fit_the_step_s_main_rows(change, said):
    noisy, t, cond = _main_rows()
    good = dict(noisy=torch.zeros(1, 4, 8, 8), t=torch.zeros(1, dtype=torch.long), hidden=torch.zeros(1, 77, 32),
                extra={"time_ids": torch.zeros(1, 6)})
    assert rows_problem(UNetRows(good["noisy"], good["t"], Conditioning(good["hidden"], good["extra"])), noisy, t, cond) == ""
    bad = good | change
    assert said in rows_problem(UNetRows(bad["noisy"], bad["t"], Conditioning(bad["hidden"], bad["extra"])), noisy, t, cond)
