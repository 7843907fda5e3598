"""Frozen weights mapped from a file on a CPU device: the same values and objects, less process memory,
no file left behind, and a run that trains and samples exactly as with the weights in memory."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.models.disk_mapping import map_frozen_to_disk
from pti_plugin.trainer import Trainer


def _rss_mib() -> float:
    """This process's resident memory, after glibc hands back the heap's free pages (a worker that ran other tests
    first may keep freed tensors in its heap instead of unmapping them)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the RSS from /proc (Linux)")
def test_mapped_weights_keep_their_values_and_objects_and_leave_process_memory(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 2048), torch.nn.LayerNorm(2048))
    module.requires_grad_(False)
    trained = module[1].weight.requires_grad_(True)  # a trainable tensor stays where it is
    trained_address = trained.data_ptr()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = dict(module.named_parameters())
    rss = _rss_mib()
    freed = map_frozen_to_disk(module, tmp_path / "out")
    assert freed == sum(p.numel() * 4 for n, p in params.items() if n != "1.weight")  # 32 MiB frozen
    assert rss - _rss_mib() > 0.8 * freed / 2**20
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # bit for bit
    assert all(p is params[n] for n, p in module.named_parameters())  # an optimizer's references hold
    assert trained.data_ptr() == trained_address
    assert list((tmp_path / "out").iterdir()) == []  # the file is unlinked once mapped
    assert map_frozen_to_disk(module, tmp_path / "out") == 0  # already mapped: no second file
    with torch.no_grad():
        module[0].bias += 1  # an in-place write (a later stage training it) works: copy-on-write
    assert torch.equal(module[0].bias, before["0.bias"] + 1)


def test_a_folder_that_cannot_hold_the_file_leaves_the_weights_in_memory(tmp_path, caplog):
    module = torch.nn.Linear(64, 64).requires_grad_(False)
    address = module.weight.data_ptr()
    (tmp_path / "taken").write_text("a file where the folder should be")
    assert map_frozen_to_disk(module, tmp_path / "taken") == 0
    assert module.weight.data_ptr() == address and "stay in memory" in caplog.text


def test_a_cpu_run_with_mapped_vae_and_text_encoders_trains_and_samples_as_in_memory(preset, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --s 2 --d 7\n")

    def run(name: str) -> tuple[Path, str]:
        raw = preset(output_dir=str(tmp_path / name), save_precision="float", cache_latents=True,
                     cache_text_encoder_outputs=True, sample_prompts=str(prompts), sample_steps=2,
                     stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
                             {"kind": "lora", "steps": 3, "learning_rate": 1e-2}])
        Trainer(build_config(raw)).run()
        return tmp_path / name, capsys.readouterr().out

    with monkeypatch.context() as patch:  # the reference: every weight stays in process memory
        patch.setattr("pti_plugin.run_setup.map_frozen_to_disk", lambda module, folder: 0)
        patch.setattr("pti_plugin.text_cache.map_frozen_to_disk", lambda module, folder: 0)
        in_memory, _ = run("in_memory")
    mapped, out = run("mapped")
    assert "VAE weights (" in out and "mapped from a file" in out
    assert "text encoders' frozen weights (" in out  # the LoRA stage (the inversion stage trains the pivot)
    for name in ("pti.safetensors", "tok1.safetensors"):
        a, b = load_file(in_memory / name), load_file(mapped / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    samples = sorted(p.relative_to(mapped) for p in mapped.rglob("*.png"))
    assert samples, "no sample was written"
    for sample in samples:  # the sampler read the mapped VAE and text encoders
        assert np.array_equal(np.asarray(Image.open(in_memory / sample)), np.asarray(Image.open(mapped / sample)))
    assert not [p for p in mapped.rglob("*") if p.name.startswith(".pti-mapped")]
