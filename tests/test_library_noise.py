"""Known library noise is dropped at import of the package; everything else passes."""

import subprocess
import sys


def test_importing_the_trainer_prints_no_known_library_noise():
    """A fresh interpreter importing the package and the libraries that make the noise prints none of it,
    while an unknown message on the same loggers still gets through."""
    code = ("import logging, pti_plugin, diffusers, diffusers.loaders.peft, peft; "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes message'); "
            "logging.getLogger('transformers.utils.import_utils').warning('another transformers message')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "gemm_4bit_forward" not in output and "requires torchvision" not in output
    assert "another bitsandbytes message" in output and "another transformers message" in output
