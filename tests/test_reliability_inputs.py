"""Reliability, round 2: bad inputs a new user gives end in a clear message naming the culprit (exit 2),
before training where possible, without a traceback and without changing earlier output."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toml
import torch
from safetensors.torch import load_file, save_file

from pti_plugin import inspect as inspect_cli
from pti_plugin.cli import main
from pti_plugin.hooks import Plugin, register_plugin

from .conftest import draw_character
from .test_reliability import REPO, _assert_clean, _cli, _output_state, short  # noqa: F401 (short: fixture)


def _nan_lora(path: Path) -> Path:
    tensor = torch.zeros(4, 32)
    tensor[1, 3] = float("nan")
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": tensor}, str(path))
    return path


def _nan_embedding(path: Path) -> Path:
    save_file({"emb_params": torch.tensor([[float("inf")] * 32])}, str(path))
    return path


def _embedding_file(path: Path) -> Path:
    save_file({"emb_params": torch.zeros(1, 32)}, str(path))
    return path


def _empty_file(path: Path) -> Path:
    save_file({}, str(path))
    return path


def _raw_safetensors(path: Path, header: dict, payload: bytes) -> Path:
    """A safetensors file with exactly ``header`` (no checks): for broken framings."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)
    return path


def _overlapping(path: Path) -> Path:
    return _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))


def _dtype_shape_mismatch(path: Path) -> Path:
    return _raw_safetensors(path, {"emb_params": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 8]}}, bytes(8))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _dataset_config(tmp_path: Path, body: str) -> str:
    return _write(tmp_path, "dataset.toml", body)


# Each case: (preset overrides, extra command-line arguments, what the message must contain).
CASES = {
    "token_with_dot": lambda t: ({"token_string": "tok.one"}, [], "'tok.one' contains '.'"),
    "token_version": lambda t: ({"token_string": "v1.5"}, [], "'v1.5' contains '.'"),
    "token_path": lambda t: ({"token_string": "a/b"}, [], "token_string' = 'a/b' contains '/'"),
    "token_tab": lambda t: ({"token_string": "tok\tx"}, [], "'token_string' must be one word"),
    "token_control": lambda t: ({}, ["--token_string", "tok\x01"], "contains '\\x01'"),
    "lr_inf": lambda t: ({}, ["--learning_rate", "inf"], "--learning_rate (command line) must be a finite number within float32 range, got inf"),
    "stage_lr_nan": lambda t: ({}, ["--set", "stages.0.learning_rate=nan"],
                               "--set stages.0.learning_rate must be a finite number within float32 range, got nan"),
    "negative_seed": lambda t: ({}, ["--seed", "-1"], "--seed (command line) must be between 0 and"),
    "resolution_three_sizes": lambda t: ({}, ["--resolution", "640,512,3"],
                                         "--resolution (command line) expects a size as kohya writes it, 'SIZE' or "
                                         "'WIDTH,HEIGHT' in whole numbers, got '640,512,3'"),
    "token_in_vocabulary_typed": lambda t: ({}, ["--token_string", "character"],
                                            "--token_string (command line): 'character' is already in the tokenizer's "
                                            "vocabulary"),
    "set_into_int": lambda t: ({}, ["--set", "stages.0.steps.x=1"], "--set stages.0.steps.x: stages.0.steps is 1, not a table"),
    "long_output_name": lambda t: ({"output_name": "n" * 300}, [], "key 'output_name' is 300 bytes long"),
    "train_data_dir_is_file": lambda t: ({"train_data_dir": _write(t, "notes.txt", "x")}, [],
                                         f"key 'train_data_dir': {t / 'notes.txt'} is a file, not a folder"),
    "output_dir_unwritable": lambda t: ({"output_dir": "/proc/pti-out"}, [], "key 'output_dir': cannot write in /proc"),
    "datasets_not_tables": lambda t: ({"train_data_dir": "", "dataset_config": _dataset_config(t, "datasets = [1, 2]")}, [],
                                      "'datasets.0' must be a table ([[datasets]]), got 1"),
    "general_not_table": lambda t: ({"train_data_dir": "", "dataset_config": _dataset_config(t, "general = 5")}, [],
                                    "'general' must be a table ([general]), got 5"),
    "subsets_not_array": lambda t: ({"train_data_dir": "", "dataset_config": _dataset_config(t, '[[datasets]]\nsubsets = "abc"')},
                                    [], "'datasets.0.subsets' must be [[datasets.subsets]] tables, got 'abc'"),
    "sample_prompt_bad_flag": lambda t: ({"sample_prompts": _write(t, "prompts.txt", "# header\ntok1 --w abc\n")}, [],
                                         "prompts.txt line 2: sample prompt flag --w expects int, got 'abc'"),
    "sample_prompt_odd_size": lambda t: ({"sample_prompts": _write(t, "prompts.txt", "tok1 --h -8\n")}, [],
                                         "line 1: --h must not be negative, got -8"),
    "nan_network_weights": lambda t: ({"network_weights": str(_nan_lora(t / "nan.safetensors"))}, [],
                                      "nan.safetensors holds non-finite values (NaN or inf) in tensor "
                                      "'lora_unet_mid_block_attentions_0_proj_in.lora_down.weight'"),
    "inf_weights": lambda t: ({"weights": str(_nan_embedding(t / "inf.safetensors"))}, [],
                              "key 'weights': " + str(t / "inf.safetensors") + " holds non-finite values"),
    "overlapping_offsets": lambda t: ({"weights": str(_overlapping(t / "overlap.safetensors"))}, [],
                                      "overlap.safetensors: tensor 'b' (data_offsets [4, 12]) overlaps the previous tensor"),
    "dtype_shape_mismatch": lambda t: ({"weights": str(_dtype_shape_mismatch(t / "short.safetensors"))}, [],
                                       "tensor 'emb_params' (F32 [1, 4]) needs 16 bytes but its data_offsets [0, 8] span 8"),
    "caption_extension_empty": lambda t: ({"caption_extension": ""}, [],
                                          "key 'caption_extension' must be a file extension such as '.txt', got ''"),
    "clip_skip_past_the_layers": lambda t: ({"clip_skip": 50}, [], "key 'clip_skip' = 50: the model's text encoder has 3 layers"),
    "random_bytes_ckpt_model": lambda t: ({"pretrained_model_name_or_path": _write_bytes(t / "model.ckpt", os.urandom(64)[1:])},
                                          [], "model.ckpt: not a PyTorch (.pt/.ckpt/.bin) file"),
    "network_weights_not_a_lora": lambda t: ({"network_weights": str(_embedding_file(t / "emb.safetensors"))}, [],
                                             "emb.safetensors is not a kohya LoRA: key 'emb_params' (1 in all)"),
    "network_weights_empty": lambda t: ({"network_weights": str(_empty_file(t / "empty.safetensors"))}, [],
                                        "empty.safetensors holds no LoRA tensors"),
    "logging_dir_is_file": lambda t: ({"log_with": "tensorboard", "logging_dir": _write(t, "notes.txt", "x")}, [],
                                      f"key 'logging_dir': {t / 'notes.txt'} is a file, not a folder"),
    "caption_template_without_token": lambda t: ({"caption_template": "a photo"}, [],
                                                 "key 'caption_template' = 'a photo' needs exactly one {} where the token goes"),
    "caption_template_two_fields": lambda t: ({}, ["--caption_template", "{} and {}"],
                                              "--caption_template (command line) = '{} and {}' needs exactly one {}"),
    "caption_template_stray_brace": lambda t: ({"caption_template": "photo of {}}"}, [], "'photo of {}}' is not a template"),
    "token_with_comma": lambda t: ({"token_string": "tok,1"}, [], "'tok,1' contains the caption separator ','"),
    "token_with_separator": lambda t: ({"token_string": "tok;;;1", "secondary_separator": ";;;"}, [],
                                       "'tok;;;1' contains the caption separator ';;;'"),
    "sample_prompt_seed_past_int64": lambda t: ({"sample_prompts": _write(t, "prompts.txt", "tok1 --d 99999999999999999999\n")},
                                                [], "prompts.txt line 1: --d must be between 0 and 9223372036854775807"),
    "locality_template_without_token": lambda t: ({"plugins": {"pivot_locality": {"templates": ["a photo"]}}}, [],
                                                  "plugins.pivot_locality: templates entry 'a photo' needs exactly one {}"),
    "text_as_pt_weights": lambda t: ({"weights": _write(t, "emb.pt", "not an embedding")}, [],
                                     "emb.pt: not a PyTorch (.pt/.ckpt/.bin) file: it is neither a zip archive nor a pickle"),
}


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(b"\x00" + data)  # never a zip or pickle start
    return str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_at_start_naming_the_culprit(case, short, tmp_path, capsys):
    overrides, extra, expected = CASES[case](tmp_path)
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(**overrides), tmp_path, capsys, extra)
    assert code == 2, seen
    assert expected in seen, seen
    assert "Traceback" not in seen
    _assert_clean(out, before)
    assert not (out / "pti.config.toml").exists() and not (out / "pti.log.jsonl").exists()  # refused before training


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused_at_start(short, tmp_path, capsys):
    out = tmp_path / "out"
    out.chmod(0o555)
    try:
        code, seen = _cli(short(), tmp_path, capsys)
    finally:
        out.chmod(0o755)
    assert code == 2 and f"key 'output_dir': cannot write in {out}" in seen and "Traceback" not in seen


def test_caption_extension_without_dot_is_read_as_kohya_does(short, tmp_path, capsys, caplog):
    data = tmp_path / "data" / "1_tok1"
    data.mkdir(parents=True)
    draw_character(data / "a.png", 0)
    (data / "a.txt").write_text("\ufefftok1 in the rain\x00 at night")  # BOM and a NUL
    code, seen = _cli(short(train_data_dir=str(data.parent), caption_extension="txt"), tmp_path, capsys)
    assert code == 0, seen
    assert "caption_extension 'txt' has no leading dot; reading it as '.txt'" in caplog.text
    assert f"caption {data / 'a.txt'} holds control characters (U+0000)" in caplog.text
    from pti_plugin.config_loading import build_config
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.scanning import scan_images

    config = build_config(short(train_data_dir=str(data.parent), caption_extension="txt", output_name="x"))
    (item,) = scan_images(config, load_subsets(config))
    assert item.caption == "tok1 in the rain  at night"  # BOM gone, NUL replaced


def test_named_pipe_in_the_dataset_is_skipped_not_opened(short, tmp_path, capsys, caplog):
    data = tmp_path / "data" / "1_tok1"
    data.mkdir(parents=True)
    draw_character(data / "good.png", 0)
    os.mkfifo(data / "pipe.png")
    code, seen = _cli(short(train_data_dir=str(data.parent)), tmp_path, capsys)  # would block forever if opened
    assert code == 0, seen
    assert f"skipping {data / 'pipe.png'}: not a regular file (a named pipe)" in caplog.text


# ----------------------------------------------------------------------------- files: inspect, unsafe pickles

@pytest.mark.parametrize("kind", ["overlapping", "dtype_shape", "text_as_pt", "truncated_zip_pt"])
def test_inspect_names_a_broken_file_without_a_traceback(kind, tmp_path, capsys):
    if kind == "overlapping":
        path, expected = _overlapping(tmp_path / "f.safetensors"), "overlaps the previous tensor"
    elif kind == "dtype_shape":
        path, expected = _dtype_shape_mismatch(tmp_path / "f.safetensors"), "needs 16 bytes"
    elif kind == "text_as_pt":
        path = tmp_path / "f.pt"
        path.write_text("these are notes, not a checkpoint")
        expected = "not a PyTorch (.pt/.ckpt/.bin) file: it is neither a zip archive nor a pickle"
    else:
        path = tmp_path / "f.pt"
        torch.save({"x": torch.zeros(3)}, path)
        path.write_bytes(path.read_bytes()[:200])
        expected = "not a readable PyTorch"
    code = inspect_cli.main([str(path)])
    seen = capsys.readouterr()
    assert code == 2 and str(path) in seen.err and expected in seen.err and "Traceback" not in seen.err + seen.out


def test_unsafe_pickle_refusal_says_what_is_allowed_not_torchs_advice(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "payload": _Payload()}, path)
    code = inspect_cli.main([str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "refused to load" in err and ("os.system" in err or "posix.system" in err)
    assert "weights_only" not in err and "will likely succeed" not in err
    assert "only tensors, plain containers" in err and "convert it to .safetensors" in err


def test_corrupt_single_file_model_is_named_before_the_tokenizer(short, tmp_path, capsys):
    model = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload()}, model)
    code, seen = _cli(short(pretrained_model_name_or_path=str(model), tokenizer_path=""), tmp_path, capsys)
    assert code == 2 and "refused to load" in seen and str(model) in seen and "tokenizer" not in seen.lower()
    assert "Traceback" not in seen


# ----------------------------------------------------------------------------- resume

@pytest.fixture
def saved_state(preset, tmp_path):
    """A 1-vector state folder from a 2-step run (kept in ``tmp_path/first``)."""
    from pti_plugin.config_loading import build_config
    from pti_plugin.trainer import Trainer

    raw = preset(output_dir=str(tmp_path / "first"), save_every_n_steps=1, save_state=True,
                 stages=[{"kind": "inversion", "steps": 2}])
    Trainer(build_config(raw)).run()
    return tmp_path / "first" / "pti-state-step00000001"


@pytest.mark.parametrize("damage", ["pickle_optimizer", "broken_progress", "more_vectors"])
def test_a_resume_state_that_cannot_fit_is_refused_naming_it(damage, saved_state, short, tmp_path, capsys):
    overrides = {"resume": str(saved_state)}
    if damage == "pickle_optimizer":
        torch.save({"state": {}, "payload": _Payload()}, saved_state / "optimizer.pt")
        expected = f"key 'resume': refused to load {saved_state / 'optimizer.pt'}"
    elif damage == "broken_progress":
        (saved_state / "progress.json").write_text('{"stage_index": 0, "stage_')
        expected = f"key 'resume': {saved_state / 'progress.json'} is not valid JSON"
    else:
        overrides["num_vectors_per_token"] = 2
        overrides["init_word"] = "character"
        expected = "holds pivot.vectors with shape [1, 32], this run's is [2, 32]"
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(**overrides), tmp_path, capsys)
    assert code == 2, seen
    assert expected in seen and "Traceback" not in seen and "weights_only" not in seen
    _assert_clean(out, before)


# ----------------------------------------------------------------------------- lost work

@register_plugin
class HugeLoraGradient(Plugin):
    """Adds a finite loss term whose gradient (1e37 per LoRA-up weight) makes an SGD step with lr 100
    overflow the weights; records the LoRA-up weights before each optimizer step."""

    name = "test_huge_lora_gradient"
    before: list[dict[str, torch.Tensor]] = []

    def extra_losses(self, state, batch, main, rows):
        ups = {n: p for n, p in state.model.unet.named_parameters() if "lora_B" in n}
        HugeLoraGradient.before.append({n: p.detach().clone() for n, p in ups.items()})
        if state.stage.kind != "lora":
            return {}
        return {"huge": 1e37 * sum(p.sum() for p in ups.values())}


def test_weights_going_non_finite_keep_the_last_finite_state_with_the_resume_command(preset, tmp_path, capsys):
    """A step whose update overflows the weights: the guard restores the weights before that step,
    saves them with the state, and prints the resume command."""
    HugeLoraGradient.before = []
    raw = preset(max_grad_norm=0.0, save_precision="float", plugins={"test_huge_lora_gradient": {}},
                 stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
                         {"kind": "lora", "steps": 3, "learning_rate": 100.0, "optimizer_type": "SGD"}])
    code, seen = _cli(raw, tmp_path, capsys)
    assert code == 3, seen
    assert "the weights became non-finite in the optimizer step at stage 1 ('lora1'), step 1" in seen
    assert "resume with: accelerate launch train_pti.py --preset" in seen and "Traceback" not in seen
    out = Path(raw["output_dir"])
    embedding = load_file(out / "tok1-interrupted-step00000002.safetensors")["emb_params"]
    lora = load_file(out / "pti-interrupted-step00000002.safetensors")
    assert torch.isfinite(embedding).all() and all(torch.isfinite(v).all() for v in lora.values())
    assert (out / "pti-state-interrupted-step00000002" / "progress.json").is_file()
    saved_ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    kept = HugeLoraGradient.before[-1]  # the weights before the failing step
    assert len(saved_ups) == len(kept) and all(torch.count_nonzero(v) == 0 for v in kept.values())
    assert all(torch.count_nonzero(v) == 0 for v in saved_ups)
    state = load_file(out / "pti-state-interrupted-step00000002" / "trainable.safetensors")
    assert all(torch.equal(state[f"unet.{n}"], kept[n]) for n in kept)


def test_permissions_of_final_files_follow_the_umask(short, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, seen = _cli(short(save_every_n_steps=1, save_state=True, stages=[{"kind": "inversion", "steps": 2}]),
                          tmp_path, capsys)
    finally:
        os.umask(old)
    assert code == 0, seen
    for name in ("pti.safetensors", "tok1.safetensors", "pti.config.toml", "pti-step00000001.safetensors"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "out" / "pti-state-step00000001").stat().st_mode & 0o777 == 0o755


def test_leftovers_of_a_killed_run_are_named_and_the_message_says_how_to_continue(short, saved_state, tmp_path, capsys, caplog):
    # What a run SIGKILLed during its final save leaves: its config, log, a state and a hidden temporary.
    first = saved_state.parent
    for name in ("pti.safetensors", "tok1.safetensors"):  # never written: the run died before
        (first / name).unlink()
    shutil.rmtree(first / "pti-state-step00000002")  # the final state, written after them: never written either
    tmp_file = first / ".pti.safetensors.k2j3abcd.tmp"
    tmp_file.write_bytes(b"\0" * 4096)
    (first / "pti.lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))  # lock of a dead process
    raw = short(output_dir=str(first), stages=[{"kind": "inversion", "steps": 2}])
    code, seen = _cli(raw, tmp_path, capsys)
    assert code == 2 and "already holds pti.config.toml" in seen and "--overwrite" in seen
    assert (f"to continue the earlier run: accelerate launch train_pti.py --preset {first / 'pti.config.toml'} "
            f"--resume {saved_state}") in seen
    assert f"taking over the lock {first / 'pti.lock'} left by process 999999 on gone" in caplog.text
    assert f"removed {tmp_file}" in caplog.text and not tmp_file.exists()
    assert not (first / "pti.lock").exists()  # released on exit
    code, seen = _cli(raw, tmp_path, capsys, ["--overwrite"])
    assert code == 0, seen


# A second run into the same output, refused at start while the first (a real process) holds its lock: in
# tests/test_save_options_probe.py, whose paused first run serves the runs refused for its token too.


def test_after_a_sigkill_the_rerun_names_the_state_and_its_resume_command_finishes(preset, tmp_path, capsys):
    """A real SIGKILL mid-run: the re-run is refused with the command that continues the dead run,
    and that command finishes it."""
    raw = preset(save_every_n_steps=1, save_state=True, stages=[{"kind": "inversion", "steps": 400}])
    preset_path = tmp_path / "p.toml"
    preset_path.write_text(toml.dumps(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / "train_pti.py"), "--preset", str(preset_path)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Path(raw["output_dir"])
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "pti-state-step00000002").is_dir() and process.poll() is None:
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=60)
    assert (out / "pti.lock").exists() and not (out / "pti.safetensors").exists()  # what a killed run leaves
    code = main(["--preset", str(preset_path)])
    err = capsys.readouterr().err
    assert code == 2 and "already holds pti.config.toml" in err and "Traceback" not in err
    hint = err.split("to continue the earlier run: accelerate launch train_pti.py ")[1].split()
    state = Path(hint[hint.index("--resume") + 1])
    assert state.name.startswith("pti-state-step") and (state / "progress.json").is_file()
    assert main(hint + ["--set", "stages.0.steps=" + str(json.loads((state / "progress.json").read_text())["stage_step"] + 1)]) == 0
    assert load_file(out / "pti.safetensors") and not (out / "pti.lock").exists()


def test_caption_extension_without_dot_in_a_dataset_config(short, tmp_path, capsys, caplog):
    images = tmp_path / "images"
    images.mkdir()
    draw_character(images / "a.png", 0)
    (images / "a.caption").write_text("tok1 on a red carpet")
    config = _dataset_config(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\ncaption_extension = "caption"\n')
    code, seen = _cli(short(train_data_dir="", dataset_config=config), tmp_path, capsys)
    assert code == 0, seen
    assert "datasets.0.subsets.0: caption_extension 'caption' has no leading dot; reading it as '.caption'" in caplog.text
    from pti_plugin.config_loading import build_config
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.scanning import scan_images

    built = build_config(short(train_data_dir="", dataset_config=config))
    assert [item.caption for item in scan_images(built, load_subsets(built))] == ["tok1 on a red carpet"]


def test_a_preset_that_is_not_text_is_named(tmp_path, capsys):
    preset_path = tmp_path / "preset.toml"
    preset_path.write_bytes(b"lr = 1\n\xd1\xff\x00")
    code = main(["--preset", str(preset_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"preset {preset_path} is not valid TOML" in err and "Traceback" not in err


def test_weight_guard_flags_only_non_finite_weights_and_puts_back_exactly_the_kept_ones():
    from pti_plugin.weight_guard import WeightGuard

    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    guard = WeightGuard()
    guard.keep(params)
    kept = [p.detach().clone() for p in params]
    with torch.no_grad():
        params[0][0, 0] = 1e30  # large but finite: left alone
    assert bool(guard.finite()) and params[0][0, 0] == 1e30
    with torch.no_grad():
        params[1][2] = float("nan")
    assert not bool(guard.finite())
    guard.restore()
    assert all(torch.equal(p, k) for p, k in zip(params, kept))  # both tensors back, bit for bit
