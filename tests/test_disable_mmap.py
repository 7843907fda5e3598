"""kohya's ``disable_mmap_load_safetensors``: a single-file model's (and ``vae``'s) ``.safetensors`` read by plain
reads instead of memory-mapped by ``safetensors``, to the same weights bit for bit; the frozen weights then stay in
process memory on a CPU device (never mapped from a file); the option is accepted from a preset, a kohya
``config_file`` and the command line, and reaches the loaders of the trainer and of the measurement scripts."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file

from pti_plugin import safe_load
from pti_plugin.cli import parse_args
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config, load_config
from pti_plugin.models.disk_mapping import map_frozen_to_disk
from pti_plugin.models.loading import load_base_model
from pti_plugin.safe_load import load_safetensors, without_mmap
from pti_plugin.text_cache import TextConditioningCache

from .test_sdxl_single_file import _MARKERS
from .test_single_file import _load_folder, to_original_layout


@pytest.fixture
def reads(monkeypatch):
    """The files ``safetensors`` opens (its memory-mapped reader, ``safe_open``, also under ``load_file``) and those
    the plain reader reads, in order."""
    seen = {"mapped": [], "plain": []}
    opener, plain = safetensors.safe_open, safe_load._read_without_mmap

    def mapped(path, *args, **kwargs):
        seen["mapped"].append(Path(path).name)
        return opener(path, *args, **kwargs)

    def read(path, *args, **kwargs):
        seen["plain"].append(Path(path).name)
        return plain(path, *args, **kwargs)

    for module in (safetensors, safetensors.torch):
        monkeypatch.setattr(module, "safe_open", mapped)
    monkeypatch.setattr(safe_load, "_read_without_mmap", read)
    return seen


def test_the_plain_reader_gives_the_written_tensors_bit_for_bit(tmp_path, reads):
    written = {
        "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
        "f64": torch.tensor([1 / 3, -0.0, float("inf")], dtype=torch.float64), "i64": torch.tensor([-(2**40), 7]),
        "i32": torch.tensor([[-3]], dtype=torch.int32), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(840000, dtype=torch.int32),
        "empty": torch.zeros(0, 4), "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "all.safetensors"
    save_file(written, str(path), metadata={"format": "pt"})

    def same(loaded, names):
        assert list(loaded) == names
        for name in names:
            a, b = loaded[name], written[name]
            assert (a.dtype, a.shape) == (b.dtype, b.shape)
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # bit for bit

    with without_mmap():
        subset, whole = load_safetensors(path, ["u8", "f32"]), load_safetensors(path)
    assert reads == {"mapped": [], "plain": ["all.safetensors"] * 2}
    same(subset, ["u8", "f32"])  # only those, in the order asked
    assert sorted(whole) == sorted(written)
    same(whole, list(whole))
    same(load_safetensors(path, ["u8", "f32"]), ["u8", "f32"])  # outside: safetensors maps it, as before
    assert reads["mapped"] == ["all.safetensors"] and len(reads["plain"]) == 2


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory) -> Path:
    """The tiny SD1.5 model as an original-layout single ``.safetensors`` checkpoint."""
    path = tmp_path_factory.mktemp("mmap") / "tiny-sd15.safetensors"
    save_file(to_original_layout(*_load_folder(tiny_model)), str(path))
    return path


def _weights(base) -> dict[str, torch.Tensor]:
    modules = {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoder}
    return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}


def _text_cache_line(base, folder: Path) -> str:
    """What the text-conditioning cache says on a CPU device as a frozen-text stage starts (no captions to encode)."""
    return TextConditioningCache(SimpleNamespace(base=base), True, torch.device("cpu"), folder).start_stage(False, [], "tok1", 1)


def test_a_single_file_model_and_vae_load_the_same_weights_without_mmap_and_stay_in_memory(single_file, tiny_model,
                                                                                            tmp_path, reads):
    def load(disable_mmap):  # the whole checkpoint as the vae too: only its first_stage_model.* tensors are read
        return load_base_model(str(single_file), single_file_config=str(tiny_model), vae=str(single_file),
                               tokenizer_path=str(tiny_model / "tokenizer"), disable_mmap=disable_mmap)

    plain = load(True)
    assert reads == {"mapped": [], "plain": ["tiny-sd15.safetensors"] * 2}  # the model, then its VAE: nothing mapped
    mapped = load(False)
    assert reads["mapped"] == ["tiny-sd15.safetensors"] * 2 and len(reads["plain"]) == 2
    a, b = _weights(plain), _weights(mapped)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # on a CPU device the frozen weights stay in process memory: no file, the same tensors
    address = plain.vae.decoder.conv_in.weight.data_ptr()
    assert map_frozen_to_disk(plain.vae, tmp_path / "kept") == 0
    assert plain.vae.decoder.conv_in.weight.data_ptr() == address and not (tmp_path / "kept").exists()
    assert _text_cache_line(plain, tmp_path / "kept") == ("text encoders' weights kept in memory "
                                                          "(disable_mmap_load_safetensors) (0 captions encoded up front)")
    assert not (tmp_path / "kept").exists()
    assert map_frozen_to_disk(mapped.vae, tmp_path / "mapped") > 0  # without the option: mapped, as before
    assert "frozen weights (" in _text_cache_line(mapped, tmp_path / "mapped")


def test_an_sdxl_single_file_is_read_without_mmap(tmp_path, reads):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in _MARKERS.items() if not k.startswith("conditioner.embedders.1")}, str(path))
    with pytest.raises(ConfigError, match="partial.safetensors: not a complete SDXL checkpoint"):  # read, then checked
        load_base_model(str(path), model_family="sdxl", tokenizer_path="/nonexistent", disable_mmap=True)
    assert reads == {"mapped": [], "plain": ["partial.safetensors"]}


def test_a_diffusers_folder_with_the_option_is_warned_about(tiny_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pti_plugin.models.loading"):
        base = load_base_model(str(tiny_model), disable_mmap=True)
    assert f"disable_mmap_load_safetensors: {tiny_model} is a diffusers folder" in caplog.text
    assert map_frozen_to_disk(base.vae, tmp_path / "kept") == 0 and not (tmp_path / "kept").exists()


def test_the_option_is_accepted_from_a_preset_a_kohya_config_file_and_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert build_config({"train_data_dir": "data"}).disable_mmap_load_safetensors is False
    assert build_config({"train_data_dir": "data", "disable_mmap_load_safetensors": True}).disable_mmap_load_safetensors
    (tmp_path / "kohya.toml").write_text('[model_arguments]\ndisable_mmap_load_safetensors = true\n'
                                         '[dataset_arguments]\ntrain_data_dir = "data"\n')
    for argv in (["--config_file", "kohya.toml"], ["--train_data_dir", "data", "--disable_mmap_load_safetensors"]):
        preset, overrides, sets = parse_args(argv)
        assert load_config(preset, overrides, sets, data_only=True).disable_mmap_load_safetensors is True


class _Loaded(Exception):
    """Raised by the stand-in loader once it has seen its arguments."""


def test_the_trainer_and_the_run_loader_pass_the_option_to_the_model_loader(preset, monkeypatch):
    from pti_plugin.metrics.run_model import open_model
    from pti_plugin.trainer import Trainer

    asked = []

    def loader(*args, **kwargs):
        asked.append(kwargs.get("disable_mmap"))
        raise _Loaded

    monkeypatch.setattr("pti_plugin.trainer.load_base_model", loader)
    monkeypatch.setattr("pti_plugin.models.loading.load_base_model", loader)  # open_model imports it as it runs
    for value in (True, False):
        config = build_config(preset(disable_mmap_load_safetensors=value))
        with pytest.raises(_Loaded):
            Trainer(config).run()
        with pytest.raises(_Loaded):
            open_model(config, device="cpu")
    assert asked == [True, True, False, False]
