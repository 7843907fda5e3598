"""Review of the kohya options of 238d1b8 and 39dfb92: each test failed before its fix.

- ddp_timeout: a timeout longer than a ``datetime.timedelta`` holds passed the start-up checks and ended the run
  with an OverflowError from building the Accelerator's process-group handler, naming no key.
- torch_compile with inductor on a machine without CUDA: the C++ compiler check imported a private PyTorch module
  (``torch._inductor.cpp_builder``) that older PyTorch versions lack; there the check ended in an ImportError
  traceback. Now it looks for a compiler on the PATH instead.
- network_train_text_encoder_only: a lora stage that trains nothing because the switch turned its train_unet off
  was refused without naming the switch; the message now names it.
"""

from __future__ import annotations

import os
import stat
import sys

import pytest

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config

#: The minutes a datetime.timedelta holds: 999999999 days and 86399.999999 s, in whole minutes.
TIMEDELTA_MINUTES = 999999999 * 24 * 60 + 1439


@pytest.mark.parametrize("minutes", [TIMEDELTA_MINUTES + 1, 10**20])
def test_a_ddp_timeout_beyond_a_timedelta_is_refused_naming_the_key(preset, minutes):
    assert build_config(preset(ddp_timeout=TIMEDELTA_MINUTES)).ddp_timeout == TIMEDELTA_MINUTES  # the longest one
    with pytest.raises(ConfigError) as caught:
        build_config(preset(ddp_timeout=minutes))
    assert caught.value.key == "ddp_timeout"
    assert f"<= {TIMEDELTA_MINUTES}" in str(caught.value) and str(caught.value).endswith(f"got {minutes}")


@pytest.fixture
def without_torch_compiler_search(monkeypatch, tmp_path):
    """A PyTorch without ``torch._inductor.cpp_builder`` (an import of it fails), no CUDA, and a PATH of one empty
    folder; returns that folder."""
    monkeypatch.setitem(sys.modules, "torch._inductor.cpp_builder", None)  # "import" raises ImportError
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("CXX", raising=False)
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    return folder


def test_inductor_without_a_compiler_on_an_older_pytorch_is_refused_naming_the_key(preset, without_torch_compiler_search):
    with pytest.raises(ConfigError) as caught:
        build_config(preset(torch_compile=True, dynamo_backend="inductor"))
    assert caught.value.key == "dynamo_backend"
    assert "found no C++ compiler (none of ['g++', 'c++', 'clang++'] on the PATH)" in str(caught.value)


def test_inductor_with_a_compiler_on_the_path_of_an_older_pytorch_is_accepted(preset, without_torch_compiler_search):
    compiler = without_torch_compiler_search / "c++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    assert os.access(compiler, os.X_OK)
    assert build_config(preset(torch_compile=True, dynamo_backend="inductor")).torch_compile


def test_a_stage_that_trains_nothing_by_network_train_text_encoder_only_names_it(preset):
    # the switch turns train_unet off; the stage turns train_text_encoder off itself: nothing is left to train
    stages = [{"kind": "inversion", "steps": 1}, {"kind": "lora", "steps": 1, "train_text_encoder": False}]
    with pytest.raises(ConfigError) as caught:
        build_config(preset(network_train_text_encoder_only=True, stages=stages))
    assert caught.value.key == "stages.1.train_pivot"
    assert "trains nothing (train_unet = false by network_train_text_encoder_only = true)" in str(caught.value)
