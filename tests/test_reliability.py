"""Reliability: bad data and bad configuration through the CLI, non-finite losses, crashes during save, interrupts."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import toml
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from pti_plugin.cli import main
from pti_plugin.config_loading import build_config
from pti_plugin.data.images import read_image
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import NonFiniteLossError, Trainer

from .conftest import draw_character

REPO = Path(__file__).resolve().parents[1]


def _cli(preset_raw: dict, tmp_path: Path, capsys, extra: list[str] = ()) -> tuple[int, str]:
    """Run the CLI in-process on ``preset_raw``; return (exit code, what the user saw on stdout+stderr)."""
    path = tmp_path / "preset.toml"
    path.write_text(toml.dumps(preset_raw))
    code = main(["--preset", str(path), *extra])
    seen = capsys.readouterr()
    return code, seen.out + seen.err


def _output_state(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}


@pytest.fixture
def short(preset, tmp_path):
    """A one-step inversion run; the output folder holds a file from an earlier run that must survive."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier-run.safetensors").write_bytes(b"earlier")

    def make(**overrides):
        return preset(**({"stages": [{"kind": "inversion", "steps": 1}]} | overrides))

    return make


def _assert_clean(out: Path, before: dict[str, bytes]) -> None:
    after = _output_state(out)
    assert after.get("earlier-run.safetensors") == b"earlier"
    assert {k: v for k, v in after.items() if k in before} == before  # no earlier file changed
    assert not [name for name in after if name.endswith(".tmp")]  # no partial file


# ----------------------------------------------------------------------------- bad data

def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _rejected_file(kind: str, folder: Path) -> str:
    """Write one unusable file of ``kind`` into ``folder``; return its name."""
    if kind == "zero_byte":
        (folder / "empty.png").write_bytes(b"")
        return "empty.png"
    if kind == "truncated_jpeg":
        data = _jpeg_bytes(Image.new("RGB", (32, 32), (200, 30, 30)))
        (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
        return "cut.jpg"
    if kind == "text_named_png":
        (folder / "notes.png").write_text("this is not an image")
        return "notes.png"
    if kind == "one_pixel":
        Image.new("RGB", (1, 1)).save(folder / "dot.png")
        return "dot.png"
    if kind == "decompression_bomb":
        Image.new("RGB", (64, 64)).save(folder / "bomb.png")  # over the limit the test sets
        return "bomb.png"
    if kind == "symlink_loop":
        os.symlink(folder / "loop.png", folder / "loop.png")
        return "loop.png"
    raise AssertionError(kind)


UNUSABLE = ["zero_byte", "truncated_jpeg", "text_named_png", "one_pixel", "decompression_bomb", "symlink_loop"]


@pytest.mark.parametrize("kind", UNUSABLE)
def test_unusable_image_is_named_and_the_run_fails_only_when_nothing_remains(kind, short, tmp_path, capsys, monkeypatch):
    """Alone in the data, the file is refused at start naming it (exit 2, no output touched); beside a usable image it
    is skipped: ``test_unusable_images_beside_a_usable_one_are_skipped_naming_each`` (one run for every kind)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 64x64 = 4096 > 2 x 2000: a "bomb"; 32x32 is fine
    data = tmp_path / "bad"
    (data / "1_tok1").mkdir(parents=True)
    name = _rejected_file(kind, data / "1_tok1")
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(train_data_dir=str(data)), tmp_path, capsys)
    assert code == 2
    assert "no usable training image" in seen and "looked at 1 image file(s), rejected 1" in seen and name in seen
    assert "Traceback" not in seen
    _assert_clean(out, before)


def test_unusable_images_beside_a_usable_one_are_skipped_naming_each(short, tmp_path, capsys, caplog, monkeypatch):
    """With a usable image beside them, each unusable file is skipped with a warning naming it and the run completes
    (one run holding one file of every kind above)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    data = tmp_path / "bad"
    (data / "1_tok1").mkdir(parents=True)
    names = [_rejected_file(kind, data / "1_tok1") for kind in UNUSABLE]
    draw_character(data / "1_tok1" / "good.png", 0)
    code, seen = _cli(short(train_data_dir=str(data), output_name="second", token_string="tok2"), tmp_path, capsys)
    assert code == 0, seen
    skipped = [line for line in caplog.text.splitlines() if "skipping " in line]
    assert all(any(name in line for line in skipped) for name in names), skipped
    assert (tmp_path / "out" / "second.safetensors").is_file()


def _treated_file(kind: str, folder: Path) -> None:
    """Write one file that needs a documented treatment (not a rejection)."""
    if kind == "png16":
        deep = Image.new("I;16", (32, 32))
        deep.putdata([int(v) for v in np.arange(32 * 32) * 60])
        deep.save(folder / "deep.png")
    elif kind == "palette_transparency":
        image = Image.new("P", (32, 32), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.info["transparency"] = 0
        image.save(folder / "pal.png", transparency=0)
    elif kind == "cmyk_jpeg":
        (folder / "cmyk.jpg").write_bytes(_jpeg_bytes(Image.new("CMYK", (32, 32), (0, 255, 255, 0))))
    elif kind == "greyscale":
        Image.new("L", (32, 32), 128).save(folder / "grey.png")
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        (folder / "rot.jpg").write_bytes(_jpeg_bytes(Image.new("RGB", (48, 32), (0, 200, 0)), exif=exif.tobytes()))
    elif kind == "empty_caption":
        draw_character(folder / "cap.png", 1)
        (folder / "cap.txt").write_text("")
    elif kind == "non_utf8_caption":
        draw_character(folder / "latin.png", 1)
        (folder / "latin.txt").write_bytes("tok1 caf\xe9".encode("latin-1"))
    elif kind == "long_caption":
        draw_character(folder / "long.png", 1)
        (folder / "long.txt").write_text("tok1 " + " ".join(["red"] * 120))
    elif kind == "caption_with_token":
        draw_character(folder / "tok.png", 1)
        (folder / "tok.txt").write_text("tok1 standing in the snow")
    else:
        raise AssertionError(kind)


_TREATMENT_MESSAGE = {
    "empty_caption": "cap.txt is empty; using the default caption instead",
    "non_utf8_caption": "latin.txt is not UTF-8",
    "long_caption": "longer than the text encoder's 75-token window (longest: 121 tokens)",
}


TREATED = ["png16", "palette_transparency", "cmyk_jpeg", "greyscale", "exif_rotated", "empty_caption", "non_utf8_caption",
           "long_caption", "caption_with_token"]


def test_image_or_caption_with_a_documented_treatment_trains(short, tmp_path, capsys, caplog):
    """One file of each kind in one folder and one step whose batch holds them all: none is skipped (every one is
    counted in the LoRA's ss_num_train_images), each documented treatment is said, and the run finishes."""
    data = tmp_path / "data"
    (data / "1_tok1").mkdir(parents=True)
    for kind in TREATED:
        _treated_file(kind, data / "1_tok1")
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(train_data_dir=str(data), train_batch_size=len(TREATED)), tmp_path, capsys)
    assert code == 0, seen
    assert "Traceback" not in seen and "skipping " not in caplog.text
    for message in _TREATMENT_MESSAGE.values():
        assert message in caplog.text
    _assert_clean(out, before)
    with safe_open(str(out / "pti.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_num_train_images"] == str(len(TREATED))


def test_image_treatments_give_the_expected_pixels(tmp_path):
    for kind in ("png16", "palette_transparency", "cmyk_jpeg", "greyscale", "exif_rotated"):
        _treated_file(kind, tmp_path)
    deep = np.asarray(read_image(tmp_path / "deep.png"))
    assert deep.dtype == np.uint8 and deep.shape == (32, 32, 3) and deep[-1, -1, 0] > 200 and deep[0, 0, 0] == 0
    assert tuple(np.asarray(read_image(tmp_path / "pal.png"))[0, 0]) == (255, 255, 255)  # transparent -> white
    assert np.asarray(read_image(tmp_path / "cmyk.jpg")).shape == (32, 32, 3)
    assert tuple(np.asarray(read_image(tmp_path / "grey.png"))[0, 0]) == (128, 128, 128)
    assert read_image(tmp_path / "rot.jpg").size == (32, 48)  # EXIF orientation applied


@pytest.mark.parametrize("layout", ["unparsed_folder_name", "empty_folder", "missing_folder"])
def test_bad_folder_layouts_are_explained(layout, short, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    if layout == "unparsed_folder_name":
        (data / "tok1_images").mkdir()
        draw_character(data / "tok1_images" / "a.png", 0)
        expected = "has no <repeats>_<name> subfolders"
    elif layout == "empty_folder":
        expected = "has no <repeats>_<name> subfolders"
    else:
        data = tmp_path / "nowhere"
        expected = "key 'train_data_dir': path not found: looked for"
    code, seen = _cli(short(train_data_dir=str(data)), tmp_path, capsys)
    assert code == 2 and expected in seen and "Traceback" not in seen


# ----------------------------------------------------------------------------- bad configuration

@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"learnin_rate": 1e-4}, "unknown key 'learnin_rate'. Did you mean 'learning_rate'?"),
        ({"learning_rate": "fast"}, "key 'learning_rate' expects float, got 'fast'"),
        ({"max_train_steps": 0}, "key 'max_train_steps' must be > 0"),
        ({"learning_rate": -1e-4}, "key 'learning_rate' must be > 0"),
        ({"stages": [{"kind": "inversion", "steps": -3}]}, "key 'stages.0.steps' must be > 0"),
        ({"resolution": 36}, "key 'resolution' must be a positive multiple of 8"),
        ({"resolution": 96, "enable_bucket": True}, "multiple of 64 (enable_bucket)"),
        ({"network_dim": 0}, "key 'network_dim' must be > 0"),
        ({"optimizer_type": "AdamWW"}, "unknown optimizer 'AdamWW'; valid: Adafactor"),
        ({"lr_scheduler": "cosin"}, "unknown scheduler 'cosin'; valid: constant"),
        ({"token_string": "character"}, "key 'token_string': 'character' is already in the tokenizer's vocabulary"),
    ],
)
def test_bad_configuration_names_the_key(overrides, expected, short, tmp_path, capsys):
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(**overrides), tmp_path, capsys)
    assert code == 2, seen
    assert expected in seen and "Traceback" not in seen
    _assert_clean(out, before)


def test_xformers_without_cuda_warns_and_uses_sdpa(short, tmp_path, capsys, caplog):
    code, seen = _cli(short(xformers=True), tmp_path, capsys)
    assert code == 0, seen
    assert "attention: sdpa" in seen and "xformers has no CPU kernels" in caplog.text


def test_output_dir_holding_this_runs_names_is_refused_unless_overwrite(short, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "pti.safetensors").write_bytes(b"an earlier LoRA")
    code, seen = _cli(short(), tmp_path, capsys)
    assert code == 2 and "already holds pti.safetensors" in seen and "overwrite = true" in seen
    assert (out / "pti.safetensors").read_bytes() == b"an earlier LoRA"
    code, seen = _cli(short(overwrite=True), tmp_path, capsys)
    assert code == 0 and load_file(out / "pti.safetensors")


def test_malicious_checkpoint_is_refused_before_training(short, tiny_model, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, checkpoint)
    code, seen = _cli(short(pretrained_model_name_or_path=str(checkpoint), tokenizer_path=str(tiny_model / "tokenizer")),
                      tmp_path, capsys)
    assert code == 2 and "model.ckpt" in seen and "safetensors" in seen and "Traceback" not in seen
    assert not marker.exists()


# ----------------------------------------------------------------------------- non-finite losses

@register_plugin
class NanInjector(Plugin):
    """Adds a NaN loss term at one global step and records the pivot after every step."""

    name = "test_nan_injector"
    pivots: list[torch.Tensor] = []

    @dataclass
    class Options:
        at_step: int = 3  # 1-based global step

    def extra_losses(self, state, batch, main, rows):
        if state.global_step + 1 == self.options.at_step:
            return {"bad": torch.tensor(float("nan"))}
        return {}

    def on_step_end(self, state, logs):
        NanInjector.pivots.append(state.pivot.vectors.detach().clone())


def test_nan_stop_saves_the_last_good_step_and_a_resume_that_meets_the_same_step_keeps_the_saved_files(preset):
    """The NaN at step 3 stops the run: the last good step's pivot is saved as an interrupted LoRA and state, no final
    file. Resumed runs repeat their steps exactly, so resuming that state meets the same NaN at its first step.
    Nothing trained since that state: the files saved by the first stop stay as they were, byte for byte (before:
    'refusing to overwrite' its own interrupted LoRA, and no resume hint), and nan_policy = "skip" goes on."""
    NanInjector.pivots = []
    raw = preset(plugins={"test_nan_injector": {"at_step": 3}}, stages=[{"kind": "inversion", "steps": 5, "learning_rate": 5e-2}])
    with pytest.raises(NonFiniteLossError, match=r"loss term 'test_nan_injector/bad' is non-finite at stage 0 \('inversion0'\), step 3") as error:
        Trainer(build_config(raw)).run()
    assert "resume with: accelerate launch train_pti.py --preset" in str(error.value)
    out = Path(raw["output_dir"])
    assert len(NanInjector.pivots) == 2  # the run ended at step 3
    saved = load_file(out / "tok1-interrupted-step00000002.safetensors")["emb_params"]
    assert torch.equal(saved, NanInjector.pivots[-1]) and torch.isfinite(saved).all()
    assert (out / "pti-state-interrupted-step00000002" / "progress.json").is_file()
    assert not (out / "pti.safetensors").exists()

    state = out / "pti-state-interrupted-step00000002"
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith("pti.log")}
    with pytest.raises(NonFiniteLossError, match=r"step 3") as error:
        Trainer(build_config(dict(raw, resume=str(state)))).run()
    assert f"nothing saved: no step finished since the resumed state {state}" in str(error.value)
    assert "--set nan_policy=skip" in str(error.value)
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in out.rglob("*") if p.is_file() and p not in before and not p.name.startswith("pti.log")]
    Trainer(build_config(dict(raw, resume=str(state), nan_policy="skip"))).run()
    assert (out / "pti.safetensors").is_file() and (out / "tok1.safetensors").is_file()


def test_nan_skip_leaves_the_weights_of_the_previous_step(preset, tmp_path):
    NanInjector.pivots = []
    raw = preset(nan_policy="skip", plugins={"test_nan_injector": {"at_step": 3}},
                 stages=[{"kind": "inversion", "steps": 5, "learning_rate": 5e-2}])
    Trainer(build_config(raw)).run()
    pivots = NanInjector.pivots
    assert len(pivots) == 5
    assert torch.equal(pivots[2], pivots[1])  # step 3 changed nothing
    assert not torch.equal(pivots[3], pivots[2]) and torch.isfinite(pivots[-1]).all()
    log = [json.loads(line) for line in (Path(raw["output_dir"]) / "pti.log.jsonl").read_text().splitlines()]
    assert [e.get("skipped_nonfinite", 0) for e in log] == [0, 0, 1.0, 0, 0]


def test_nan_skip_stops_after_max_consecutive_skips(preset):
    raw = preset(nan_policy="skip", max_nan_skips=1, plugins={"test_nan_injector": {"at_step": 2}},
                 stages=[{"kind": "inversion", "steps": 3}])
    NanInjector.pivots = []

    class Always(NanInjector):
        def extra_losses(self, state, batch, main, rows):
            return {"bad": torch.tensor(float("inf"))} if state.global_step >= 1 else {}

    register_plugin(type("AlwaysNan", (Always,), {"name": "test_always_nan"}))
    raw["plugins"] = {"test_always_nan": {}}
    with pytest.raises(NonFiniteLossError, match="2 consecutive skipped steps"):
        Trainer(build_config(raw)).run()


@register_plugin
class InfGradient(NanInjector):
    """At one global step, a loss term of value 0 whose gradient on the pivot is inf (sqrt's slope at 0)."""

    name = "test_inf_gradient"

    def extra_losses(self, state, batch, main, rows):
        if state.global_step + 1 != self.options.at_step:
            return {}
        vectors = state.pivot.vectors
        return {"flat": torch.sqrt(vectors - vectors.detach()).sum()}  # value 0.0, gradient +inf


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # the clipping norm answers for the gradients, or a pass of its own
def test_a_non_finite_gradient_under_a_finite_loss_is_caught(max_grad_norm, preset, tmp_path):
    NanInjector.pivots = []
    stages = [{"kind": "inversion", "steps": 4, "learning_rate": 5e-2}]
    raw = preset(nan_policy="skip", max_grad_norm=max_grad_norm, plugins={"test_inf_gradient": {"at_step": 3}}, stages=stages)
    Trainer(build_config(raw)).run()
    pivots = NanInjector.pivots
    assert len(pivots) == 4 and torch.equal(pivots[2], pivots[1]) and torch.isfinite(pivots[-1]).all()
    assert not torch.equal(pivots[3], pivots[2])
    stop = preset(output_dir=str(tmp_path / "stop"), max_grad_norm=max_grad_norm, plugins={"test_inf_gradient": {"at_step": 3}},
                  stages=stages)
    with pytest.raises(NonFiniteLossError, match=r"^a gradient is non-finite at stage 0 \('inversion0'\), step 3 "):
        Trainer(build_config(stop)).run()


# ----------------------------------------------------------------------------- crash during save

def test_crash_during_save_keeps_the_previous_checkpoint(preset, tmp_path, monkeypatch):
    import pti_plugin.atomic_io as atomic_io

    real_replace = os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        if str(dst).endswith("pti-step00000002.safetensors"):
            Path(src).write_bytes(Path(src).read_bytes()[:100])  # half-written, then the process "dies"
            raise OSError(28, "No space left on device")
        calls["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", dying_replace)
    raw = preset(save_every_n_steps=1, stages=[{"kind": "inversion", "steps": 3}])
    with pytest.raises(atomic_io.DiskFullError, match=r"disk full while writing .*pti-step00000002.safetensors: needed .* MB free in"):
        Trainer(build_config(raw)).run()
    out = Path(raw["output_dir"])
    assert load_file(out / "pti-step00000001.safetensors")  # previous checkpoint intact and loadable
    assert not (out / "pti-step00000002.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- interrupts

def test_sigint_saves_a_resumable_state_that_finishes_like_an_uninterrupted_run(preset, tmp_path):
    """Ctrl-C as ``accelerate launch`` (one process) passes it on: the terminal's SIGINT, then the launcher's SIGTERM
    to the same process right after. The SIGTERM used to be taken for a second Ctrl-C (stop at once, nothing
    saved); the run saves once, and the printed resume command finishes it bit-identically to a run never stopped."""
    raw = preset(save_precision="float", log_every_n_steps=1,
                 stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
                         {"kind": "lora", "steps": 8, "learning_rate": 1e-2}])
    raw.pop("output_dir")
    preset_path = tmp_path / "p.toml"
    preset_path.write_text(toml.dumps(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "train_pti.py"), "--preset", str(preset_path),
                                "--output_dir", str(interrupted)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = interrupted / "pti.log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):  # into the lora stage, 7 steps to go
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    match = re.search(r"resume with: (.*)", err)
    assert match, err[-2000:]
    resume_cmd = match.group(1).split()
    assert resume_cmd[:3] == ["accelerate", "launch", str(REPO / "train_pti.py")]  # the script as it was started
    state = Path(resume_cmd[resume_cmd.index("--resume") + 1])
    assert state.is_dir() and not (interrupted / "pti.safetensors").exists()
    assert main(resume_cmd[3:]) == 0  # the printed command, in-process (saves a Python start-up)
    assert main(["--preset", str(preset_path), "--output_dir", str(tmp_path / "straight")]) == 0
    a, b = load_file(interrupted / "pti.safetensors"), load_file(tmp_path / "straight" / "pti.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_file(interrupted / "tok1.safetensors")["emb_params"],
                       load_file(tmp_path / "straight" / "tok1.safetensors")["emb_params"])


def _breaking_samples(tmp_path: Path, monkeypatch, tag: str, error: str) -> Path:
    """A one-line sample prompt file; the trainer's samples tagged ``tag`` raise RuntimeError(``error``)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --s 1\n")
    original = Trainer.sample

    def sample(self, wanted):
        if wanted == tag:
            raise RuntimeError(error)
        return original(self, wanted)

    monkeypatch.setattr(Trainer, "sample", sample)
    return prompts


def test_a_sample_that_fails_during_training_is_a_warning_and_training_goes_on(preset, tmp_path, monkeypatch, caplog):
    """A sample between steps that breaks (here a simulated out-of-memory error at step 2) used to end the run
    with a traceback, losing the steps since the last save; now it is a warning and the run finishes."""
    prompts = _breaking_samples(tmp_path, monkeypatch, "step00000002", "CUDA out of memory (simulated)")
    raw = preset(sample_prompts=str(prompts), sample_steps=1, sample_every_n_steps=1,
                 stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2}])
    with caplog.at_level(logging.WARNING, logger="pti_plugin.sampling"):
        outputs = Trainer(build_config(raw)).run()
    assert "samples step00000002 failed, the run goes on without them: RuntimeError: CUDA out of memory" in caplog.text
    out = Path(raw["output_dir"])
    assert (out / "pti.safetensors").is_file() and (out / "tok1.safetensors").is_file()
    samples = {p.name for p in (out / "samples").iterdir()}
    assert any("step00000001" in n for n in samples) and any("step00000003" in n for n in samples)
    assert not any("step00000002" in n for n in samples) and outputs["samples"]


def test_a_signal_during_samples_between_steps_stops_them_and_saves_at_once(preset, tmp_path, monkeypatch):
    """SIGTERM while samples are drawn used to wait for every sample before the save (a cluster's SIGKILL follows
    its SIGTERM after a grace time); now the samples stop, the step's state is saved and the run stops."""
    import os
    import signal as signals
    import time

    from pti_plugin.trainer import TrainingInterrupted

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --s 1\n")
    finished = []

    def sample(self, tag):
        if tag == "step00000002":
            os.kill(os.getpid(), signals.SIGTERM)
            for _ in range(200):  # 10 s of "sampling", cut short by the signal
                time.sleep(0.05)
            finished.append(tag)
        return []

    monkeypatch.setattr(Trainer, "sample", sample)
    raw = preset(sample_prompts=str(prompts), sample_steps=1, sample_every_n_steps=1,
                 stages=[{"kind": "inversion", "steps": 4, "learning_rate": 5e-2}])
    started = time.monotonic()
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGTERM after step 2"):
        Trainer(build_config(raw)).run()
    assert not finished and time.monotonic() - started < 9
    assert (Path(raw["output_dir"]) / "pti-state-interrupted-step00000002" / "progress.json").is_file()
    assert signals.getsignal(signals.SIGTERM) is not None  # the handlers are put back


def test_final_samples_that_fail_leave_the_saved_run_and_no_grid(preset, tmp_path, monkeypatch, caplog):
    """After the final save a failing sample used to end the run with a traceback (exit 1) although the LoRA and the
    embedding were written; now a warning, the run's outputs without samples and without the before/after grid."""
    prompts = _breaking_samples(tmp_path, monkeypatch, "final", "sampler broke (simulated)")
    raw = preset(sample_prompts=str(prompts), sample_steps=1, sample_at_first=True,
                 stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}])
    with caplog.at_level(logging.WARNING, logger="pti_plugin.sampling"):
        outputs = Trainer(build_config(raw)).run()
    assert "samples final failed, the run goes on without them: RuntimeError: sampler broke" in caplog.text
    assert outputs["samples"] == [] and "before_after" not in outputs and outputs["lora"].is_file()
