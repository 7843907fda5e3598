"""The analysis commands run as a user runs them, on the files users have (a kohya LoRA where a model is expected,
a base-model checkpoint where a LoRA is, an SDXL folder given to the SD1.x toy-world scripts, a run whose model
or images moved, an output folder that is a file, a preview folder inside the dataset): each ends in a usage
error naming the option (exit 2) before anything loads or is written, with no traceback."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest
import toml
import torch
from safetensors.torch import save_file

from .test_analysis_inputs import _refused

REPO = Path(__file__).resolve().parents[1]


def _script(path: str) -> dict:
    """The globals of ``path`` (a script of this repository), run under another name than ``__main__``."""
    return runpy.run_path(str(REPO / path), run_name=Path(path).stem + "_under_test")


@pytest.fixture
def kohya_lora(tmp_path) -> Path:
    """A LoRA as kohya writes it (its key names, no metadata of ours), at a path with a space."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "my lora.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """The header of an original-layout single-file model (the UNet and VAE prefixes are what tells it)."""
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    return path


# ----------------------------------------------------------------------------- ellipsoid_check.py

def test_ellipsoid_check_names_model_when_given_a_lora_or_a_run_folder(kohya_lora, tmp_path, capsys):
    """The loader's message named the training preset's key ("preset: key 'pretrained_model_name_or_path'"), a key
    the command does not have."""
    cli = _script("analysis/ellipsoid_check.py")["cli"]
    run = tmp_path / "my run"
    run.mkdir()
    (run / "pti.safetensors").write_bytes(kohya_lora.read_bytes())
    for model, what in ((kohya_lora, "this is a LoRA (key 'lora_unet_"), (run, "has no model_index.json")):
        assert cli(["--model", str(model), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"ellipsoid_check: error: --model: {model}" in err and what in err, err
        assert "preset" not in err and "pretrained_model_name_or_path" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, content, message", [
    ("my sentences.txt", "\n \n", "no sentences (expected one sentence per line)"),
    ("my captions.json", '{"annotations": []}', "no captions found"),
    ("my sentences.json", "[1, 2]", "a JSON list must hold sentences (strings), got 1"),
])
def test_ellipsoid_check_reads_the_sentences_before_the_model(name, content, message, tmp_path, capsys):
    """A sentence file without sentences is named with --sentences before the model loads (the missing --model is
    not reached); a JSON list of numbers was read as the sentences '1' and '2'."""
    sentences = tmp_path / name
    sentences.write_text(content)
    parse_args = _script("analysis/ellipsoid_check.py")["parse_args"]
    err = _refused(lambda: parse_args(["--model", str(tmp_path / "no model"), "--sentences", str(sentences),
                                       "--out", str(tmp_path / "o")]), capsys)
    assert f"--sentences {sentences}: {message}" in err
    assert not (tmp_path / "o").exists()


def test_ellipsoid_check_names_an_index_past_the_prompt(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PTI_PLUGIN_CACHE", str(tmp_path / "cache"))
    cli = _script("analysis/ellipsoid_check.py")["cli"]
    assert cli(["--model", str(tiny_model), "--index", "77", "--out", str(tmp_path / "o")]) == 2
    assert "ellipsoid_check: error: --index 77: the model's prompts have 77 token positions; use 1 to 76" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the SD1.x toy-world scripts

@pytest.mark.parametrize("script, argv", [
    ("analysis/toy_quality.py", []),
    ("analysis/position_timesteps.py", ["--quick"]),
    ("analysis/interpolation_paths.py", ["--quick"]),
])
def test_toy_world_scripts_refuse_an_sdxl_folder_before_loading(script, argv, tiny_sdxl, tmp_path, capsys):
    """toy_quality and position_timesteps loaded it and ended in a TypeError traceback in the UNet's first call;
    interpolation_paths blamed a prompt word."""
    parse = _script(script)["main" if "toy_quality" in script else "parse_args"]
    err = _refused(lambda: parse([*argv, "--model", str(tiny_sdxl), "--out", str(tmp_path / "o")]), capsys)
    assert f"--model {tiny_sdxl}: an SDXL model (model_index.json names StableDiffusionXLPipeline)" in err
    assert "pass an SD1.x diffusers folder" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- output folders

@pytest.fixture
def afile(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("mine\n")
    return path


def test_position_timesteps_refuses_an_out_that_is_a_file_before_sampling(afile, capsys):
    """It sampled every switch point, then ended in FileExistsError."""
    parse_args = _script("analysis/position_timesteps.py")["parse_args"]
    assert f"--out {afile}: exists and is not a folder" in _refused(lambda: parse_args(["--out", str(afile)]), capsys)
    assert afile.read_text() == "mine\n"


@pytest.mark.parametrize("under", [False, True])
def test_position_leakage_refuses_an_out_under_a_file_before_loading_the_run(under, afile, tmp_path, capsys):
    """It measured the run (minutes of sampling), then ended in NotADirectoryError; the run folder here holds no run:
    the refusal comes first."""
    out = afile / "sub" if under else afile
    main = _script("analysis/position_leakage.py")["main"]
    err = _refused(lambda: main(["--run", str(tmp_path), "--out", str(out)]), capsys)
    assert f"--out {out}: " in err and ("is a file" in err if under else "exists and is not a folder" in err)
    assert afile.read_text() == "mine\n"


# ----------------------------------------------------------------------------- a run whose files moved

@pytest.fixture
def moved_run(preset, tmp_path):
    """A finished run's folder (its resolved config and a LoRA file) whose config names what the test moves away."""

    def make(**overrides) -> Path:
        run = tmp_path / "my run"
        run.mkdir()
        (run / "pti.config.toml").write_text(toml.dumps(preset(output_dir=str(run), **overrides)))
        (run / "pti.safetensors").write_bytes(b"")  # never read: the refusal comes first
        return run

    return make


def test_position_leakage_names_the_runs_config_for_a_model_that_moved(moved_run, tmp_path, capsys):
    """The message said "preset: key 'pretrained_model_name_or_path'"; the run's config file names it."""
    run = moved_run(pretrained_model_name_or_path=str(tmp_path / "gone model"))
    main = _script("analysis/position_leakage.py")["main"]
    err = _refused(lambda: main(["--run", str(run), "--n_seeds", "2"]), capsys)
    assert f"--run {run}: {run / 'pti.config.toml'}: key 'pretrained_model_name_or_path': base model not found" in err
    assert "preset" not in err
    assert sorted(p.name for p in run.iterdir()) == ["pti.config.toml", "pti.safetensors"]


def test_position_leakage_names_training_images_that_moved_before_the_model_loads(moved_run, tmp_path, capsys,
                                                                                   monkeypatch):
    """It loaded the model, then ended in "[Errno 2] No such file or directory" without saying what the folder was."""
    from pti_plugin.models import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the run's images were read")

    monkeypatch.setattr(loading, "load_base_model", no_load)
    run = moved_run(train_data_dir=str(tmp_path / "gone data"))
    main = _script("analysis/position_leakage.py")["main"]
    err = _refused(lambda: main(["--run", str(run), "--n_seeds", "2"]), capsys)
    assert (f"{run / 'pti.config.toml'}: key 'train_data_dir': the run's training images cannot be read "
            f"(No such file or directory: {tmp_path / 'gone data'})") in err


# ----------------------------------------------------------------------------- the dataset preview

@pytest.fixture
def own_dataset(tiny_dataset, tmp_path) -> Path:
    data = tmp_path / "my data"
    shutil.copytree(tiny_dataset, data)
    return data


def _preview(preset, data: Path, tmp_path: Path, save: Path) -> int:
    from pti_plugin.dataset_preview import main

    path = tmp_path / "p.toml"
    path.write_text(toml.dumps(preset(train_data_dir=str(data))))
    return main(["--preset", str(path), "--n", "2", "--save_images", str(save)])


def test_preview_images_are_not_written_where_training_reads_images(preset, own_dataset, tmp_path, capsys):
    """Written into the image folder, the previews were trained on (and counted in the next preview: 6 images)."""
    folder = own_dataset / "2_tok1"
    before = sorted(p.name for p in folder.iterdir())
    assert _preview(preset, own_dataset, tmp_path, folder) == 2
    assert (f"--save_images {folder}: it holds the dataset's images: training would read the previews written there"
            in capsys.readouterr().err)
    assert _preview(preset, own_dataset, tmp_path, own_dataset / "5_previews") == 2
    assert (f"--save_images {own_dataset / '5_previews'}: it lies directly in train_data_dir {own_dataset}"
            in capsys.readouterr().err)
    assert sorted(p.name for p in folder.iterdir()) == before and sorted(p.name for p in own_dataset.iterdir()) == ["2_tok1"]
    assert _preview(preset, own_dataset, tmp_path, folder / "previews") == 0  # not read by training: written
    assert sorted(p.name for p in (folder / "previews").iterdir()) == ["step00000_slot000.png", "step00000_slot001.png"]


# ----------------------------------------------------------------------------- a model where a LoRA is expected

def test_inspect_and_load_pti_say_a_checkpoint_is_a_base_model(checkpoint, tiny_model, capsys):
    from diffusers import StableDiffusionPipeline

    from pti_plugin.formats import LoraFormatError
    from pti_plugin.inspect import main as inspect_main
    from pti_plugin.load_pti import load_pti

    assert inspect_main([str(checkpoint)]) == 1
    assert "note: it is a base-model checkpoint (a single-file model), not a LoRA or an embedding" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, local_files_only=True)
    with pytest.raises(LoraFormatError, match=r"model.safetensors: unexpected key .*it is a base-model checkpoint"):
        load_pti(pipe, checkpoint)
    assert not pipe.get_list_adapters()
