"""The README's promises: the plain-diffusers snippet reproduces the trained model, the kohya table is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.kohya_options import markdown_table
from pti_plugin.trainer import Trainer

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = "an anime illustration of tok1"


def _snippet(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- snippet: {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no snippet {marker!r}"
    return match.group(1)


def _fixed_inputs(width: int):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500])


@register_plugin
class PredictionProbe(Plugin):
    """Records the in-memory model's noise prediction for PROMPT after training."""

    name = "test_prediction_probe"
    prediction: torch.Tensor | None = None

    @torch.no_grad()
    def on_end(self, state):
        cond = state.encode(state.tokenize([PROMPT]).to(state.device))
        x, t = _fixed_inputs(cond.hidden_states.shape[-1])
        PredictionProbe.prediction = state.unet(x, t, cond)


@pytest.mark.parametrize("network_args", [[], ["conv_dim=2", "conv_alpha=1"]], ids=["lora", "locon"])
def test_plain_diffusers_snippet_reproduces_the_trained_model(preset, tiny_model, network_args):
    raw = preset(save_precision="float", plugins={"test_prediction_probe": {}}, network_args=network_args,
                 stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2},
                         {"kind": "lora", "steps": 3, "learning_rate": 2e-2}])
    config = build_config(raw)
    Trainer(config).run()
    namespace = {"MODEL_DIR": str(tiny_model), "OUT": config.output_dir}
    exec(_snippet("plain-diffusers"), namespace)  # the README lines, verbatim
    pipe = namespace["pipe"]
    with torch.no_grad():
        cond = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        x, t = _fixed_inputs(cond.shape[-1])
        reloaded = pipe.unet(x, t, cond).sample
    assert PredictionProbe.prediction is not None
    assert (reloaded - PredictionProbe.prediction).abs().max() < 1e-4
    with torch.no_grad():  # and the LoRA + pivot matter: the base model's prediction is far from it
        pipe.unload_lora_weights()
        base = pipe.unet(x, t, cond).sample
    assert (base - PredictionProbe.prediction).abs().max() > 1e-3


def test_readme_kohya_table_is_current():
    assert markdown_table() in README.read_text()


def test_sdxl_embedding_snippet_loads_both_vectors(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    saved = {"clip_l": torch.randn(1, widths[0]), "clip_g": torch.randn(1, widths[1])}
    save_file(saved, str(tmp_path / "tok1.safetensors"))
    namespace = {"pipe": pipe, "OUT": str(tmp_path), "load_file": load_file}  # the plain snippet's import
    exec(_snippet("sdxl-embedding"), namespace)  # the README lines, verbatim
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("tok1")]
        assert torch.equal(row.detach(), saved[key][0])
