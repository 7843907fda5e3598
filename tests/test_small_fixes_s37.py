"""Small command-line and message defects: a --set below an unknown key named as typed; --debug_dataset checks only
what the dataset needs; the pivot-locality start-up line says where its centre comes from; one caption lookup."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from pti_plugin.cli import main as train_main
from pti_plugin.config_loading import build_config
from pti_plugin.dataset_preview import main as preview_main
from pti_plugin.hooks import Plugin, register_plugin

from .conftest import draw_character


class SetUp(BaseException):
    """Raised once the plugins before :class:`StopAfterSetup` are set up: the start-up lines are said, nothing trained
    (not an Exception: a stop the test makes, which the trainer does not take for the plugin's error)."""


@register_plugin
class StopAfterSetup(Plugin):
    name = "test_stop_after_setup"

    def on_setup(self, state):
        raise SetUp


def _preset(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return str(path)


def _images(folder: Path, captions: list[str]) -> None:
    folder.mkdir(parents=True)
    for i, caption in enumerate(captions):
        draw_character(folder / f"{i}.png", i)
        (folder / f"{i}.txt").write_text(caption)


@pytest.mark.parametrize("typed, expected", [
    ("nokey.x=1", "error: --set nokey.x: unknown key 'nokey'."),
    ("stages.0.nokey.y=1", "error: --set stages.0.nokey.y: unknown key 'stages.0.nokey'."),
    ("plugins.nosuch.x=1", "error: --set plugins.nosuch.x: unknown plugin 'nosuch'."),
    ("plugins.pivot_locality.foo.x=1", "error: --set plugins.pivot_locality.foo.x: unknown key 'plugins.pivot_locality.foo'."),
    ("plugins.pivot_locality.weight.x=1",
     "error: --set plugins.pivot_locality.weight.x: key 'plugins.pivot_locality.weight' expects float, got {'x': 1}"),
])
def test_a_set_below_an_unknown_or_wrong_key_names_the_set_typed(tmp_path, capsys, typed, expected):
    """Each said "preset: ..." before, though the preset does not hold the key: the --set typed does."""
    preset = _preset(tmp_path, f'train_data_dir = "{tmp_path}"\n')
    assert train_main(["--preset", preset, "--set", typed]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and "preset" not in err, err
    # the preset's own unknown plugin stays the preset's
    assert train_main(["--preset", _preset(tmp_path, f'train_data_dir = "{tmp_path}"\n[plugins.nosuch]\nx = 1\n')]) == 2
    assert capsys.readouterr().err.startswith("error: preset: unknown plugin 'nosuch'.")


def test_debug_dataset_checks_only_what_the_dataset_needs(tmp_path, capsys):
    """kohya's --debug_dataset shows the dataset before it loads the model or prepares the accelerator: a model,
    sample prompts or an output folder that does not exist, or a GPU-only precision on a CPU, stopped train_pti.py
    --debug_dataset before ("path not found", "needs a CUDA GPU") though the preview needs none of them."""
    _images(tmp_path / "train" / "2_tok1", ["tok1, red hair", "tok1, smile"])
    common = ["--train_data_dir", str(tmp_path / "train"), "--resolution", "32"]
    elsewhere = ["--pretrained_model_name_or_path", str(tmp_path / "no model"), "--sample_prompts",
                 str(tmp_path / "no prompts.txt"), "--output_dir", str(tmp_path / "out"), "--mixed_precision", "fp16"]
    assert preview_main(common) == 0
    expected = capsys.readouterr().out
    assert train_main(common + elsewhere + ["--debug_dataset"]) == 0
    assert capsys.readouterr().out == expected and "tok1, red hair" in expected
    preset = _preset(tmp_path, f'debug_dataset = true\npretrained_model_name_or_path = "{tmp_path / "no model"}"\n')
    assert train_main(["--preset", preset] + common) == 0  # asked for in the preset
    assert capsys.readouterr().out == expected
    assert not (tmp_path / "out").exists()
    # without it, the same command is refused at start as before, naming the model
    assert train_main(["--preset", preset, "--debug_dataset", "false"] + common) == 2
    assert "key 'pretrained_model_name_or_path': path not found" in capsys.readouterr().err


def test_the_pivot_locality_start_up_line_says_where_the_centre_comes_from(preset, tmp_path, tiny_model, caplog):
    """The start-up lines said the geometry but not which centre it slerps about: a centre file (which one, measured
    on what) or the built-in estimate."""
    from transformers import CLIPTextModel

    from pti_plugin.centre_file import save_centre_file
    from pti_plugin.models.sd15 import final_layer_norm
    from pti_plugin.trainer import Trainer

    norm = final_layer_norm(CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder", local_files_only=True))
    centre = tmp_path / "centre.safetensors"
    save_centre_file(centre, torch.zeros(77, 32), norm.weight.detach(), norm.bias.detach(),
                     {"clip_skip": 1, "model": {"path": "/models/sd15", "width": 32},
                      "prompt_set": {"name": "built-in", "size": 300, "hash": "0" * 16}})
    stages = [{"kind": "inversion", "steps": 1}, {"kind": "lora", "steps": 1}]
    options = {"geometry": "centered", "probe_every_n_steps": 0}
    caplog.set_level(logging.INFO)
    with pytest.raises(SetUp):
        Trainer(build_config(preset(stages=stages, plugins={"pivot_locality": options | {"centre_file": str(centre)},
                                                            "test_stop_after_setup": {}}))).run()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pivot_locality: stages")]
    assert len(said) == 1 and (f"; centre: file {centre} (measured on /models/sd15, clip_skip 1, 300 sentences: "
                               "built-in); class prompts: ") in said[0], said


def test_each_images_caption_file_is_looked_up_once(preset, tmp_path, monkeypatch, caplog):
    """The scan looked up every image's caption file twice: to read it, and again for the letter-case note."""
    from pti_plugin.data import captions, scanning
    from pti_plugin.data.dataset import load_subsets

    _images(tmp_path / "data" / "1_tok1", ["tok1 a", "tok1 b", "tok1 c"])
    (tmp_path / "data" / "1_tok1" / "2.txt").rename(tmp_path / "data" / "1_tok1" / "2.TXT")
    looked: list[str] = []
    original = captions.caption_file

    def counted(image, extension):
        looked.append(image.name)
        return original(image, extension)

    monkeypatch.setattr(captions, "caption_file", counted)
    monkeypatch.setattr(scanning, "caption_file", counted)
    built = build_config(preset(train_data_dir=str(tmp_path / "data")))
    with caplog.at_level(logging.WARNING):
        items = scanning.scan_images(built, load_subsets(built), log_notes=False)
    assert sorted(looked) == ["0.png", "1.png", "2.png"]
    assert [item.caption for item in items] == ["tok1 a", "tok1 b", "tok1 c"]
    assert "1 caption file(s)" in caplog.text and "(2.TXT)" in caplog.text


@pytest.mark.skipif(os.name == "nt", reason="a drive letter and '\\' are ordinary in a path on Windows")
def test_every_not_found_message_has_the_one_form(tmp_path, capsys):
    """"<what> not found: looked for <absolute path>" and, for a path that looks like a Windows one, what to write
    instead: the preset and the centre file lacked the hint (and the centre file's message, "looked for")."""
    from pti_plugin.centre_file import CentreFileError, load_centre_file

    windows = r"C:\Users\me\presets\my.toml"
    assert train_main(["--preset", windows]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: preset not found: looked for {Path(windows).resolve()}; it looks like a Windows path (drive C:), which "
        "this machine cannot open: give the folder's path on this machine (under WSL: /mnt/c/Users/me/presets/my.toml)")
    backslashed = r"out\centre.safetensors"
    with pytest.raises(CentreFileError) as error:
        load_centre_file(backslashed)
    assert str(error.value) == (f"centre file not found: looked for {Path(backslashed).resolve()}; '\\' is "
                                "part of a file name here, not a folder separator: write 'out/centre.safetensors' "
                                "(forward slashes, no trailing backslash)")
