"""Several processes (multi-GPU runs): the latent disk cache is written once, each process encoding its share; a
state resumed by another number of processes is warned about, naming both; a refusal every process finds later in the
set-up is printed once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import toml
import torch

from pti_plugin import cli

from pti_plugin.config_loading import build_config
from pti_plugin.data import latents as latents_module
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.latents import LatentSource
from pti_plugin.data.scanning import scan_images
from pti_plugin.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


class _Process:
    """What the latent cache asks of the run's accelerator, for one of two processes played by threads."""

    def __init__(self, rank: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0
        self._barrier = barrier

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=120)


def fill_as_two_processes(sources: list[LatentSource]) -> None:
    """``sources[rank].fill_cache`` on two threads (named ``rank0``, ``rank1``) playing processes 0 and 1."""
    barrier, errors = threading.Barrier(2), []

    def process(rank: int) -> None:
        try:
            sources[rank].fill_cache(_Process(rank, barrier))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            barrier.abort()
            errors.append(exc)

    threads = [threading.Thread(target=process, args=(rank,), name=f"rank{rank}") for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_two_processes_write_each_latent_cache_file_once_and_read_the_same_latents(tiny_model, tiny_dataset, tmp_path,
                                                                                  monkeypatch):
    """cache_latents_to_disk under 2 processes: 4 images x flip at vae_batch_size 2 are 4 batches; each process encodes
    and writes 2 of them (before: both encoded and wrote all 8 files), and both hold every latent, bit for bit those
    of one process caching in memory at the same vae_batch_size."""
    from diffusers import AutoencoderKL

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)  # the cache is written beside the images
    config = build_config({"train_data_dir": str(data), "resolution": 32, "flip_aug": True})
    items = scan_images(config, load_subsets(config))
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    writes: list[tuple[str, str]] = []
    save = latents_module.save_safetensors_atomic
    monkeypatch.setattr(latents_module, "save_safetensors_atomic",
                        lambda path, *a, **k: (writes.append((threading.current_thread().name, path.name)), save(path, *a, **k)))
    sources = [LatentSource(vae, items, seed=0, cache=True, to_disk=True, batch_size=2) for _ in range(2)]
    fill_as_two_processes(sources)
    assert len(writes) == 8 and len({name for _, name in writes}) == 8  # 4 images x (plain, flip), each written once
    assert sorted(thread for thread, _ in writes) == ["rank0"] * 4 + ["rank1"] * 4
    assert len(list(data.rglob("*.pti_latents.safetensors"))) == 8
    alone = LatentSource(vae, items, seed=0, cache=True, to_disk=False, batch_size=2)
    alone.fill_cache()
    for index in range(4):
        for flip in (False, True):
            for source in sources:
                assert torch.equal(source.latent(index, flip), alone.latent(index, flip))


def test_a_state_saved_by_two_processes_resumed_by_one_warns_naming_both_global_batches(preset, tiny_dataset, tmp_path,
                                                                                         caplog):
    """A 2-process run (batch 1: global batch 2, the latents cached to disk) saves a state at step 2 of 3; one process
    resumes it: warned, naming both global batches and process counts (before: silent), it continues at step 2 as
    kohya's resume does and trains step 3 alone. The 2-process run wrote each latent cache file (4 images, no flip)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    raw = preset(train_batch_size=1, train_data_dir=str(data), cache_latents_to_disk=True,
                 save_state=True, save_every_n_steps=2,
                 stages=[{"name": "lora", "kind": "lora", "learning_rate": 1e-2, "steps": 3}])
    raw.pop("output_dir")
    (tmp_path / "p.toml").write_text(toml.dumps(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_pti.py"),
                          "--preset", "p.toml", "--output_dir", "two"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list(data.rglob("*.pti_latents.safetensors"))) == 4
    state = tmp_path / "two" / "pti-state-step00000002"
    assert json.loads((state / "progress.json").read_text())["batch"] == {
        "processes": 2, "train_batch_size": 1, "gradient_accumulation_steps": 1}
    with caplog.at_level(logging.WARNING):
        Trainer(build_config(raw | {"output_dir": str(tmp_path / "one"), "resume": str(state)})).run()
    assert (f"state {state} was saved by a run of global batch 2 (2 process(es) x train_batch_size 1 x "
            "gradient_accumulation_steps 1); this run's is 1 (1 process(es) x train_batch_size 1 x "
            "gradient_accumulation_steps 1). It continues at step 2 of stage 0") in caplog.text
    log = [json.loads(line) for line in (tmp_path / "one" / "pti.log.jsonl").read_text().splitlines()]
    assert [entry["global_step"] for entry in log] == [3]


def _store() -> torch.distributed.TCPStore:
    """A key-value store as a launcher's, with the environment a launcher gives its processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return torch.distributed.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))


def test_a_refusal_both_processes_find_is_printed_by_process_0_alone(monkeypatch, capsys):
    """A refusal each process finds later in the set-up (the data, the model): process 0 prints it; process 1 says
    nothing when process 0 printed the same message (before: both printed it), and its own when process 0 printed
    another or nothing within QUIET_WAIT_S (then at its end, not at once)."""
    store = _store()
    monkeypatch.setattr(cli, "SAID_GRACE_S", 0)
    monkeypatch.setattr(cli, "QUIET_WAIT_S", 1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli._fail("error: no usable training image", 2, alike=True) == 2  # process 0 has said nothing
    assert capsys.readouterr().err == "error: no usable training image\n"
    monkeypatch.setenv("RANK", "0")
    assert cli._fail("error: no usable training image", 2) == 2
    assert capsys.readouterr().err == "error: no usable training image\n"
    monkeypatch.setenv("RANK", "1")
    assert cli._fail("error: no usable training image", 2, alike=True) == 2
    assert capsys.readouterr().err == ""
    assert cli._fail("error: model file unreadable", 2, alike=True) == 2  # this process alone found it
    assert capsys.readouterr().err == "error: model file unreadable\n"
