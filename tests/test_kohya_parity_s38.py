"""Small kohya-parity and first-screen fixes: the data-loader worker cap, the start-up info lines the console shows,
a preset's "W,H" size, ``--help`` / ``--list_keys``, and the output folder and sizes in the start-up block.

Expectations are kohya sd-scripts' where it has the rule (``train_network.py``: ``n_workers =
min(args.max_data_loader_n_workers, os.cpu_count())``, no message; ``prepare_dataset_args``: ``"512,768"`` is
``[512, 768]``), else the README's words, written out by hand."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pti_plugin.cli import main
from pti_plugin.config import Config, ConfigError
from pti_plugin.config_loading import load_config
from pti_plugin.data.batch_source import MicroBatchStream
from pti_plugin.run_setup import Placement, announce


# ----------------------------------------------------------------------------- 1. worker cap


def test_data_loader_workers_are_capped_at_the_cpu_count_as_kohya_does(monkeypatch):
    draws = SimpleNamespace(settings=SimpleNamespace(seed=0))  # no worker starts before a stage is iterated
    for asked, cpus, started in [(8, 2, 2), (3, 2, 2), (2, 2, 2), (1, 2, 1), (0, 2, 0), (2, 16, 2)]:
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        stream = MicroBatchStream(draws, asked, persistent=True, accumulation=1)
        assert (stream._loader.num_workers, stream._loader.persistent_workers) == (started, started > 0), (asked, cpus)
        stream.close()


# ----------------------------------------------------------------------------- 2. info lines on the console


def test_the_left_out_keys_info_lines_reach_the_console(tmp_path, caplog, monkeypatch):
    """The README promises an info line for the kohya_ss GUI's ``epoch``/``noise_offset_type`` and for a kohya
    option asking for nothing (``no_half_vae = true``); the console shows the root logger's WARNING and up, so these
    loggers must let their info records through while the configuration is read (and only then)."""
    monkeypatch.delenv("RANK", raising=False)
    names = ("pti_plugin.config", "pti_plugin.kohya_config_file")
    before = [logging.getLogger(name).level for name in names]
    gui = tmp_path / "gui.toml"
    gui.write_text('epoch = 10\nnoise_offset_type = "Original"\nno_half_vae = true\n')
    root, root_level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.WARNING)  # the console's level (main's basicConfig)
    try:
        assert main(["--config_file", str(gui)]) == 2  # no train_data_dir: refused after the file is read
    finally:
        root.setLevel(root_level)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"kohya config_file {gui}: epoch, noise_offset_type left out: no option of kohya's train_network" in (
        " ".join(infos))
    assert "kohya option no_half_vae = True asks for nothing pti-plugin lacks; left out" in infos
    assert [logging.getLogger(name).level for name in names] == before  # restored: no other info line shows


# ----------------------------------------------------------------------------- 3. a preset's "W,H"


@pytest.mark.parametrize("written, expected", [('"512,768"', [512, 768]), ('"640"', 640), ("[512, 768]", [512, 768])])
def test_a_presets_size_text_is_read_as_the_command_line_reads_it(tmp_path, written, expected):
    (tmp_path / "data").mkdir()
    preset = tmp_path / "p.toml"
    preset.write_text(f'train_data_dir = "data"\nresolution = {written}\nskip_image_resolution = "256,320"\n')
    config = load_config(preset)
    assert (config.resolution, config.skip_image_resolution) == (expected, [256, 320])
    typed = load_config(None, {"train_data_dir": str(tmp_path / "data")}, ["resolution=512,768"])
    assert typed.resolution == [512, 768]


def test_a_presets_bad_size_text_is_refused_as_the_command_lines(tmp_path):
    (tmp_path / "data").mkdir()
    preset = tmp_path / "p.toml"
    preset.write_text('train_data_dir = "data"\nresolution = "512,"\n')
    tail = " expects a size as kohya writes it, 'SIZE' or 'WIDTH,HEIGHT' in whole numbers, got '512,'"
    with pytest.raises(ConfigError) as refused:
        load_config(preset)
    assert str(refused.value) == "preset: key 'resolution'" + tail
    with pytest.raises(ConfigError) as typed:
        load_config(None, {"train_data_dir": str(tmp_path / "data")}, ["resolution=512,"])
    assert str(typed.value) == "--set resolution" + tail


# ----------------------------------------------------------------------------- 4. --help and --list_keys


def test_help_lists_resume_and_overwrite_and_list_keys_writes_stages_as_a_preset_does(capsys):
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert "\n  --resume STATE_FOLDER " in shown and "\n  --overwrite " in shown
    assert main(["--list_keys"]) == 0
    listed = capsys.readouterr().out
    assert "StageConfig(" not in listed
    stages = listed[listed.index("\nstages = "):]
    assert ('\n    [[stages]]\n    name = "inversion"\n    kind = "inversion"\n    learning_rate = 0.005\n'
            '    [[stages]]\n    name = "lora"\n    kind = "lora"\n    learning_rate = 0.0001\n') in stages
    assert "\n    stages.N.steps = None\n        Optimizer steps in this stage" in stages
    assert "\nplugins = {}" in stages  # the next top-level key follows


# ----------------------------------------------------------------------------- 6. the start-up block


def _announced(subsets, buckets_of_items, entries) -> list[str]:
    lines: list[str] = []
    base = SimpleNamespace(source="/models/m", family=SimpleNamespace(name="SD1.5"), prediction_type="epsilon")
    items = [SimpleNamespace(bucket=b) for b in buckets_of_items]
    announce(lines.append, Config(), base, Placement("sdpa", torch.float32), torch.device("cpu"), items=items,
             entries=entries, processes=1, global_batch=2, frozen_text=[], trainable_dtype=torch.float32,
             subsets=subsets, output_dir=Path("/runs/out"))
    return lines


def test_the_start_up_block_names_the_output_folder_and_the_sizes():
    square = SimpleNamespace(resolution=(32, 32), bucket_settings=(False, 256, 1024, 64, False))
    lines = _announced([square, square], [(32, 32)] * 3, [0, 0, 1, 2])
    assert lines[0].endswith("3 images, 4 entries with repeats; 1 process(es), global batch 2; device cpu")
    assert lines[1] == "output folder /runs/out; resolution 32x32, buckets off"
    bucketed = SimpleNamespace(resolution=(512, 512), bucket_settings=(True, 256, 1024, 64, False))
    lines = _announced([bucketed], [(576, 448), (448, 576), (512, 512)], [0, 1, 1, 2, 2, 2])
    assert lines[1] == ("output folder /runs/out; resolution 512x512, buckets on: 3 in use "
                        "(448x576 x2, 512x512 x3, 576x448 x1)")
    many = _announced([bucketed, square], [(64 * i, 64) for i in range(1, 11)], list(range(10)))
    assert many[1] == ("output folder /runs/out; resolution 512x512, 32x32, buckets on (in some subsets): 10 in use "
                       "(64x64 x1, 128x64 x1, 192x64 x1, 256x64 x1, 320x64 x1, 384x64 x1, 448x64 x1, 512x64 x1, "
                       "2 more)")
