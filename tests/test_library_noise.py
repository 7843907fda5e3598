"""Known library noise is dropped at import of the package; everything else passes."""

import subprocess
import sys

import pytest


def test_importing_the_trainer_prints_no_known_library_noise():
    """A fresh interpreter importing the package and the libraries that make the noise prints none of it,
    while an unknown message on the same loggers still gets through."""
    code = ("import logging, torch, pti_plugin, diffusers, diffusers.loaders.peft, peft; "
            "unet = diffusers.UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, "
            "down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), "
            "cross_attention_dim=8, attention_head_dim=2, sample_size=8); unet.to('cpu', torch.float32); "
            "logging.getLogger('diffusers.models.modeling_utils').warning('that should be kept in float32: [\\'x\\']'); "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes message'); "
            "logging.getLogger('transformers.utils.import_utils').warning('another transformers message')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "gemm_4bit_forward" not in output and "requires torchvision" not in output
    assert "kept in float32: []" not in output and "kept in float32: ['x']" in output
    assert "another bitsandbytes message" in output and "another transformers message" in output


@pytest.mark.parametrize("entry", ["runpy.run_path({train!r}, run_name='imported')", "from pti_plugin.cli import main"],
                         ids=["train_pti.py", "pti-train"])
def test_the_trainer_process_never_looks_up_the_hub(tmp_path, entry):
    """train_pti.py reads local files only: nothing it imports may reach the Hugging Face Hub (bitsandbytes, which
    peft and diffusers import, asks the Hub for an optional CPU kernel at import on CPUs with AVX512-BF16). The
    process records every host name looked up; it also says nothing about that kernel."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import runpy, socket\n"
        "looked_up = []\n"
        "def refuse(host, *args, **kwargs):\n"
        "    looked_up.append(host)\n"
        "    raise OSError('no network in this test')\n"
        "socket.getaddrinfo = refuse\n"
        + entry.format(train=str(repo / "train_pti.py")) + "\n"
        "import diffusers, peft  # noqa: F401\n"
        "print('looked up:', looked_up)\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "looked up: []" in done.stdout, done.stdout
    assert "kernels-community" not in done.stderr, done.stderr
