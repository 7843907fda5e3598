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
