"""Several processes (multi-GPU runs): the latent disk cache is written once, each process encoding its share; a
refusal every process finds later in the set-up is printed once; one process 1 alone finds is printed at once."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from datetime import timedelta

import torch

from pti_plugin import cli, main_process_checks

from pti_plugin.config_loading import build_config
from pti_plugin.data import latents as latents_module
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.latents import LatentSource
from pti_plugin.data.scanning import scan_images


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


# A state saved by two processes resumed by one warns naming both global batches: test_accelerator_options's
# test_two_processes_with_the_ddp_options_match_one_process_and_their_state_resumed_by_one_warns_naming_both_batches
# (one two-process run serves both).


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


def test_a_refusal_process_1_alone_finds_is_printed_at_once_when_process_0_passed_its_place(monkeypatch, capsys):
    """A refusal only process 1 finds (a file it alone could not read, a plugin's check on process 1): process 0
    found none there and reaches the next point where every process waits for the others (a broadcast, a barrier,
    DDP's wrapping), saying so first; process 1 prints its refusal at once (before: after QUIET_WAIT_S, 30 s, for a
    word from process 0 that never came). Both processes passed the same earlier points."""
    store = _store()
    monkeypatch.setattr(cli, "QUIET_WAIT_S", 20)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(main_process_checks, "_points_passed", 2)  # this test plays both processes in one
    main_process_checks.passed_without_refusal()  # process 0, at its 3rd point
    monkeypatch.setattr(main_process_checks, "_points_passed", 2)  # process 1, refused after its 2nd
    monkeypatch.setenv("RANK", "1")
    started = time.monotonic()
    assert cli._fail("error: 3.png: cannot identify image file", 2, alike=True) == 2
    assert capsys.readouterr().err == "error: 3.png: cannot identify image file\n"
    assert time.monotonic() - started < 5
