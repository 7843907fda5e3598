"""The ellipsoid check and the position-leakage measurement on the tiny SDXL-shaped model (two text encoders)."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pti_plugin import ellipsoid as E
from pti_plugin.centre_file import load_centre_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    from pti_plugin.models.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    from pti_plugin.models.loading import load_base_model

    return load_base_model(str(sdxl_dir))


@pytest.fixture(scope="module")
def sentences(sdxl):
    return E.builtin_sentences(sdxl.tokenizer, size=60) + E.template_word_sentences(sdxl.tokenizer)


@pytest.fixture(scope="module")
def results(sdxl, sentences):
    return E.analyse_per_encoder(sdxl, sentences, index=5, batch_size=32)


def test_one_block_per_encoder_with_its_width(sdxl, sentences, results):
    assert [r.encoder for r in results] == ["text_encoder", "text_encoder_2"]
    assert [r.dim for r in results] == [te.config.hidden_size for te in sdxl.text_encoders] == [32, 48]
    # no final LayerNorm in SDXL's conditioning: no LayerNorm figures, no gamma/beta
    assert all(r.layernorm == {"present": False} and r.gamma is None and r.beta is None for r in results)
    assert all(r.num_sentences == len(sentences) and r.verdict["label"] in ("supported", "not supported")
               for r in results)
    with pytest.raises(ValueError, match="2 text encoders"):
        E.analyse(sdxl, sentences[:4])


def _stats(radii: np.ndarray) -> list[float]:
    return [radii.mean(), radii.std(), radii.std() / radii.mean()]


def test_encoder_2_statistics_are_its_own_penultimate_states(sdxl, sentences, results):
    """The second block's numbers equal a direct computation on text_encoder_2's penultimate hidden states,
    tokenised by its own tokenizer (which pads with '!', not EOS)."""
    tokenizer, encoder = sdxl.tokenizers[1], sdxl.text_encoders[1]
    ids = tokenizer(sentences, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        h = encoder(ids, output_hidden_states=True).hidden_states[-2].double().numpy()  # [N, 77, 48]
    eos = np.array([1 + list(row[1:]).index(tokenizer.eos_token_id) for row in ids.tolist()])
    block = results[1]
    tol = dict(rtol=1e-5, atol=1e-7)
    for i in (1, 3, 5, 7):
        sel = eos > i
        vecs = h[sel, i]
        assert block.curves["count"][i] == sel.sum() > 1
        np.testing.assert_allclose([block.curves["centre"][k][i] for k in ("mean", "std", "cv")],
                                   _stats(np.linalg.norm(vecs - vecs.mean(0), axis=1)), **tol)
        np.testing.assert_allclose([block.curves["origin"][k][i] for k in ("mean", "std", "cv")],
                                   _stats(np.linalg.norm(vecs, axis=1)), **tol)
        np.testing.assert_allclose(block.centre[i].double().numpy(), vecs.mean(0), rtol=1e-5, atol=1e-6)
    eos_vecs = h[np.arange(len(eos)), eos]
    np.testing.assert_allclose([block.eos_centre.mean, block.eos_centre.std, block.eos_centre.cv],
                               _stats(np.linalg.norm(eos_vecs - eos_vecs.mean(0), axis=1)), **tol)
    assert block.index_centre.cv == pytest.approx(_stats(np.linalg.norm(h[eos > 5, 5] - h[eos > 5, 5].mean(0), axis=1))[2])


def test_script_reports_per_encoder_and_says_layernorm_does_not_apply(sdxl_dir, tmp_path):
    out = tmp_path / "out"
    saved, buffer = sys.argv, io.StringIO()
    sys.argv = [str(REPO / "analysis" / "ellipsoid_check.py"), "--model", str(sdxl_dir), "--template_words",
                "--max_sentences", "40", "--out", str(out)]
    try:
        with contextlib.redirect_stdout(buffer):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        assert exc.code == 0
    finally:
        sys.argv = saved
    printed = buffer.getvalue().strip().splitlines()
    assert any(line.startswith("LayerNorm geometry does not apply") for line in printed)
    assert printed[-1].startswith("VERDICT: ") and "text_encoder_2" in printed[-1]
    report = json.loads((out / "ellipsoid.json").read_text())
    blocks = report["encoders"]
    assert [(name, b["width"], b["offset"]) for name, b in blocks.items()] == [("text_encoder", 32, 0), ("text_encoder_2", 48, 32)]
    assert report["width"] == 80 and report["layernorm_geometry"]["applies"] is False
    for block in blocks.values():
        assert block["layernorm"] == {"present": False} and len(block["per_index"]["centre_cv"]) == 77
    # the centre file holds the centre of the concatenated [77, 32 + 48] states, gamma = 1 and beta = 0
    centre = load_centre_file(out / "centre.safetensors", expected_dim=80)
    assert centre.centre.shape == (77, 80) and centre.metadata["layernorm"] is False
    assert torch.equal(centre.gamma, torch.ones(80)) and torch.equal(centre.beta, torch.zeros(80))
    assert centre.metadata["encoders"] == [{"name": "text_encoder", "width": 32}, {"name": "text_encoder_2", "width": 48}]
    assert centre.metadata["clip_skip"] == 1
    assert (out / "ellipsoid_text_encoder_2.png").read_bytes()[:4] == b"\x89PNG"


def test_position_leakage_runs_on_sdxl(sdxl_dir, tiny_dataset):
    """The leakage measurement end to end on the SDXL base model (1 sampling step, 2 seeds): both encoders'
    states and the pooled embedding reach the pipeline and the UNet."""
    from pti_plugin.config_loading import build_config
    from pti_plugin.metrics.leakage import measure_position_leakage
    from pti_plugin.metrics.run_model import open_model

    config = build_config({"pretrained_model_name_or_path": str(sdxl_dir), "train_data_dir": str(tiny_dataset),
                           "resolution": 32, "output_dir": "unused"}, check_paths=False)
    run = open_model(config, device="cpu", class_word="girl")
    assert type(run.pipe).__name__ == "StableDiffusionXLPipeline"
    cond = run.conditioning([run.prompt("{T}", True)])
    assert cond.hidden_states.shape == (1, 77, 80) and cond.added_cond_kwargs["text_embeds"].shape == (1, 48)
    m = measure_position_leakage(run, ["{T}"], ["{T} at the top left"], seeds=[0, 1], steps=1, guidance=2.0, grid=4)
    assert np.isfinite(m.score) and m.score <= 1
    assert m.heatmaps["tuned"].shape == (2, 2, 16, 16) and m.training_heatmaps["base"].shape[-2:] == (16, 16)
    assert all(0 <= r["centroid_x"] <= 1 and 0 <= r["centroid_y"] <= 1 for r in m.rows)


def test_position_leakage_script_measures_an_sdxl_trained_run(preset, sdxl_dir, tmp_path):
    """A tiny SDXL run trained by the trainer, measured by ``analysis/position_leakage.py``: its LoRA and both
    encoders' pivot embeddings are loaded (the LoRA switch changes the UNet's prediction; both tokenizers know
    the token), and the script reports the leakage, per resolution too (the tiny SDXL UNet's 8x8 and 4x4 levels)."""
    from pti_plugin.config_loading import build_config
    from pti_plugin.metrics.run_model import load_run
    from pti_plugin.trainer import Trainer

    run_dir = tmp_path / "run"
    Trainer(build_config(preset(pretrained_model_name_or_path=str(sdxl_dir), output_dir=str(run_dir)))).run()
    run = load_run(run_dir, device="cpu")
    assert type(run.pipe).__name__ == "StableDiffusionXLPipeline"
    for tokenizer in (run.pipe.tokenizer, run.pipe.tokenizer_2):
        assert tokenizer.convert_tokens_to_ids(run.token) != tokenizer.unk_token_id
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    cond = run.conditioning([run.prompt("{T}", True)])
    with torch.no_grad():
        predictions = []
        for lora_on in (True, False):
            with run.lora(lora_on):
                predictions.append(run.unet(x, t, cond))
    assert (predictions[0] - predictions[1]).abs().max() > 1e-6

    main = runpy.run_path(str(REPO / "analysis" / "position_leakage.py"))["main"]
    with contextlib.redirect_stdout(io.StringIO()):
        record = main(["--run", str(run_dir), "--n_seeds", "2", "--steps", "2", "--guidance", "2", "--grid", "4",
                       "--prompts", "{T}", "--edit_prompts", "{T} at the top left", "--by_resolution",
                       "--out", str(tmp_path / "leak")])
    assert np.isfinite(record["leakage_score"]) and list(record["by_resolution"]) == ["8x8", "4x4"]
    assert json.loads((tmp_path / "leak" / "position_leakage.json").read_text())["base_model"] == str(sdxl_dir)
