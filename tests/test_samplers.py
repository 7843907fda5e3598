"""kohya's ``sample_sampler`` names: each samples an image on the tiny model, and a ``k_`` alias samples the very
image of the name it stands for (same seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pti_plugin.config import ConfigError, build_config
from pti_plugin.models.loading import load_base_model
from pti_plugin.sampling import SAMPLERS, sample_scheduler

ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}


@pytest.fixture(scope="module")
def base(tiny_model):
    return load_base_model(str(tiny_model))


def _image(base, name: str) -> np.ndarray:
    pipe = base.pipeline(sample_scheduler(name, base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a", num_inference_steps=3, width=32, height=32, guidance_scale=2.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - set(ALIASES)))
def test_every_kohya_sampler_samples_a_finite_image_with_the_models_prediction_type(base, name):
    image = _image(base, name)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0
    assert sample_scheduler(name, base.noise_scheduler.config).config.prediction_type == base.prediction_type


@pytest.mark.parametrize("alias, name", sorted(ALIASES.items()))
def test_a_k_name_samples_the_image_of_the_name_it_stands_for(base, alias, name):
    assert np.array_equal(_image(base, alias), _image(base, name))


def test_a_sampler_kohya_does_not_name_is_refused_listing_the_names(tmp_path):
    with pytest.raises(ConfigError, match=r"sample_sampler' must be one of .*'dpmsolver\+\+'.*got 'dpm\+\+ 2m karras'"):
        build_config({"train_data_dir": str(tmp_path), "sample_sampler": "dpm++ 2m karras"})


def test_a_prompts_ss_flag_samples_it_with_that_sampler_and_the_next_prompt_with_the_default(base, tmp_path):
    """kohya's per-prompt ``--ss``: the prompt's image is the one a run whose sample_sampler is that sampler gives,
    bit for bit, and the next prompt without ``--ss`` is back on the run's own sampler."""
    from pti_plugin.sampling import generate_samples, parse_prompt_line

    def pngs(default: str, lines: list[str], name: str) -> list[bytes]:
        pipe = base.pipeline(sample_scheduler(default, base.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        out = [tmp_path / f"{name}-{i}.png" for i in range(len(lines))]
        generate_samples(pipe, [parse_prompt_line(line) for line in lines], (32, 32), 3, out)
        return [p.read_bytes() for p in out]

    mixed = pngs("ddim", ["a --ss Euler A --d 1", "a --d 1"], "mixed")
    assert mixed[0] == pngs("euler_a", ["a --d 1"], "euler")[0]
    assert mixed[1] == pngs("ddim", ["a --d 1"], "ddim")[0] and mixed[0] != mixed[1]


def test_an_unknown_ss_sampler_is_refused_at_start_naming_the_file_and_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --ss euler\ntok1 --ss dpm++ 2m karras\n")
    with pytest.raises(ConfigError, match=r"prompts.txt line 2: sample prompt flag --ss expects one of kohya's sampler "
                                          r"names \(ddim, .*got 'dpm\+\+ 2m karras'"):
        build_config({"train_data_dir": str(tmp_path), "sample_prompts": str(prompts)})
