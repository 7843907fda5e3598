"""The user's commands on a model of SD1.5's shapes (77 tokens, a 768-wide text encoder, a factor-8 VAE, 512 px
images), where the tiny test models (32 px images, a factor-2 VAE) hide a shape assumption. The model here keeps
those shapes at small widths, so it builds in a second or two."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from pti_plugin.models.single_file import SD15_CONFIG_DIR
from pti_plugin.toy_world import WEIGHTS_DIR

from .test_analysis_inputs import _refused

REPO = Path(__file__).resolve().parents[1]


def _script(path: str) -> dict:
    """The globals of ``path`` (a script of this repository), run under another name than ``__main__``."""
    return runpy.run_path(str(REPO / path), run_name=Path(path).stem + "_under_test")


@pytest.fixture(scope="module")
def sd15_shaped(tmp_path_factory) -> Path:
    """A diffusers folder of SD1.5's shapes at small widths: UNet sample_size 64 with a 4-level (factor-8) VAE, so
    its pipeline draws 512 px images as SD1.5's does; a 768-wide text encoder with 77 positions."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pti_plugin.models.word_vocab import BOS, EOS, write_tokenizer_files

    out = tmp_path_factory.mktemp("sd15_shaped")
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files((), out / "tokenizer"), local_files_only=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=8, sample_size=512)
    ids = {key: tokenizer.convert_tokens_to_ids(t) for key, t in (("bos_token_id", BOS), ("eos_token_id", EOS))}
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                                pad_token_id=ids["eos_token_id"], **ids))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    return out


def test_native_image_size_is_the_pipelines_default_size(sd15_shaped, tiny_model):
    """SD1.5 draws 512 px (sample_size 64 x 8), the toy world and the tiny test model 32 px (16 x 2)."""
    from pti_plugin.script_args import native_image_size

    assert native_image_size(SD15_CONFIG_DIR) == 512
    assert native_image_size(sd15_shaped) == 512
    assert native_image_size(WEIGHTS_DIR) == 32
    assert native_image_size(tiny_model) == 32


@pytest.mark.parametrize("script, argv", [
    ("analysis/toy_quality.py", []),
    ("analysis/position_timesteps.py", ["--quick"]),
    ("analysis/interpolation_paths.py", ["--quick"]),
    ("analysis/research_protocol.py", ["h1", "--quick"]),
])
def test_toy_world_scripts_say_they_measure_toy_world_models_only(script, argv, sd15_shaped, tmp_path, capsys):
    """On an SD1.5 model, toy_quality and position_timesteps drew 512 px images for hours (96 prompts, 20+ steps) for
    the toy world's 32 px detectors to misread; interpolation_paths and research_protocol stopped on a toy prompt word
    the vocabulary lacked (research_protocol with a ValueError traceback), or, where the vocabulary had it, went on as
    the others. Now each is a usage error naming --model and what the command measures, before the model loads."""
    parse = _script(script)["main" if "toy_quality" in script else "parse_args"]
    out = tmp_path / "o"
    err = _refused(lambda: parse([*argv, "--model", str(sd15_shaped), "--out", str(out)]), capsys)
    assert f"--model {sd15_shaped}: a model whose images are 512 px, not a toy-world model" in err
    assert "toy world's detectors, which read its 32 px scenes" in err
    assert "analysis/ellipsoid_check.py --model and analysis/position_leakage.py --run" in err
    assert "Traceback" not in err and not out.exists()
