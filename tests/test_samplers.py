"""kohya's ``sample_sampler`` names: each samples an image on the tiny model, and a ``k_`` alias samples the very
image of the name it stands for (same seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.models.loading import load_base_model
from pti_plugin.sampling import SAMPLERS, sample_scheduler

# diffusers' k-schedulers warn on every step under numpy 2 (np.array(copy=False), __array_wrap__): not ours, and many
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

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


def test_training_samples_are_conditioned_as_training_is_with_clip_skip(preset, tmp_path):
    """kohya's clip_skip 2 (the penultimate layer's states, then the final LayerNorm) trains on one conditioning;
    the samples drawn during training used to ignore it (the pipeline's own last-layer encoding). Without guidance
    (--l 1, so no negative prompt), a sample must be the image of that conditioning, computed here with
    transformers' hidden states, and not the last-layer image."""
    from PIL import Image

    from pti_plugin.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --l 1 --d 3 --s 2\n")
    trainer = Trainer(build_config(preset(clip_skip=2, sample_prompts=str(prompts), sample_steps=2,
                                          stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}])))
    outputs = trainer.run()
    sample = np.asarray(Image.open(outputs["samples"][0]).convert("RGB")).astype(int)
    base = trainer.model.base
    pipe = base.pipeline(sample_scheduler("ddim", base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    encoder = base.text_encoders[0]
    ids = pipe.tokenizer("a red square", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    def image_of(skip: int) -> np.ndarray:
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
            embeds = output.last_hidden_state if skip == 1 else encoder.final_layer_norm(output.hidden_states[-skip])
            image = pipe(prompt_embeds=embeds, width=32, height=32, num_inference_steps=2, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(3)).images[0]
        return np.asarray(image.convert("RGB")).astype(int)

    assert np.abs(sample - image_of(2)).max() <= 1  # PNG rounding
    assert np.abs(sample - image_of(1)).max() > 1
