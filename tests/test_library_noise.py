"""Known library noise is dropped at import of the package; everything else passes."""

import subprocess
import sys


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
