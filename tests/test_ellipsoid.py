"""The ellipsoid check (pti_plugin/ellipsoid/, analysis/ellipsoid_check.py) and the centre file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pti_plugin import ellipsoid as E
from pti_plugin.centre_file import CentreFileError, load_centre_file, save_centre_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model):
    from pti_plugin.models.loading import load_base_model

    return load_base_model(str(tiny_model))


@pytest.fixture(scope="module")
def sentences(model):
    return E.builtin_sentences(model.tokenizer, size=80) + E.template_word_sentences(model.tokenizer)


@pytest.fixture(scope="module")
def result(model, sentences):
    return E.analyse(model, sentences, index=5, batch_size=16)


def _numpy_stats(radii: np.ndarray) -> tuple[float, float, float]:
    return radii.mean(), radii.std(), radii.std() / radii.mean()


def test_layernorm_ratio_is_one(result):
    ln = result.layernorm
    assert ln["present"] and ln["conditioning_is_layernorm"]
    assert abs(ln["whitened_norm_ratio_mean"] - 1) < 1e-3
    assert abs(ln["whitened_norm_ratio_min"] - 1) < 1e-3 and abs(ln["whitened_norm_ratio_max"] - 1) < 1e-3
    assert ln["reconstruction_relative_error"] < 1e-5
    assert result.to_json()["layernorm_whitened_norm_ratio"] == ln["whitened_norm_ratio_mean"]


def test_cv_matches_direct_numpy(model, sentences, result):
    """Index, EOS and per-index numbers equal a direct computation on family.encode's outputs."""
    with torch.no_grad():
        ids = model.tokenize(sentences)
        h = model.encode(ids).hidden_states.double().numpy()
    eos_id = model.tokenizer.eos_token_id
    eos = np.array([1 + list(row[1:]).index(eos_id) for row in ids.tolist()])
    tol = dict(rtol=1e-5, atol=1e-7)
    for i in (1, 3, 5, 7):
        sel = eos > i  # sentences with a word at index i
        vecs = h[sel, i]
        centre = vecs.mean(0)
        m, s, cv = _numpy_stats(np.linalg.norm(vecs - centre, axis=1))
        assert result.curves["count"][i] == sel.sum()
        np.testing.assert_allclose([result.curves["centre"][k][i] for k in ("mean", "std", "cv")], [m, s, cv], **tol)
        np.testing.assert_allclose(result.centre[i].double().numpy(), centre, rtol=1e-5, atol=1e-6)
        if i == 5:
            np.testing.assert_allclose(result.index_centre.cv, cv, **tol)
            assert result.index_centre.n == sel.sum() and result.to_json()["cv_about_centre"] == result.index_centre.cv
        m, s, cv = _numpy_stats(np.linalg.norm(vecs, axis=1))
        np.testing.assert_allclose([result.curves["origin"][k][i] for k in ("mean", "std", "cv")], [m, s, cv], **tol)
    eos_vecs = h[np.arange(len(eos)), eos]
    m, s, cv = _numpy_stats(np.linalg.norm(eos_vecs - eos_vecs.mean(0), axis=1))
    np.testing.assert_allclose([result.eos_centre.mean, result.eos_centre.std, result.eos_centre.cv], [m, s, cv], **tol)
    m, s, cv = _numpy_stats(np.linalg.norm(eos_vecs, axis=1))
    np.testing.assert_allclose(result.eos_origin.cv, cv, **tol)
    # BOS: the same state for every sentence, so its CV about the centre is undefined
    assert np.isnan(result.curves["centre"]["cv"][0]) and result.to_json()["per_index"]["centre_cv"][0] is None
    # padding-only positions: no sentence has a word there
    assert result.curves["count"][-1] == 0 and np.isnan(result.curves["centre"]["cv"][-1])


def test_second_pass_without_cache_is_identical(model, sentences, result):
    again = E.analyse(model, sentences, index=5, batch_size=16, cache_bytes=0)
    assert again.index_centre.cv == result.index_centre.cv and again.eos_centre.cv == result.eos_centre.cv
    assert torch.equal(again.centre, result.centre)


def test_eos_gather_picks_the_right_positions(model):
    ids = torch.tensor([[9, 1, 2, 7, 7, 7], [9, 1, 7, 7, 7, 7], [9, 1, 2, 3, 4, 5], [9, 7, 7, 7, 7, 7]])
    eos = E.eos_positions(ids, eos_token_id=7)
    assert eos.tolist() == [3, 2, 5, 1]  # no EOS id: the last position
    states = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(4, 6, 2)
    assert torch.equal(E.gather_positions(states, eos), torch.stack([states[n, p] for n, p in enumerate(eos.tolist())]))
    assert E.word_mask(eos, 6)[0].tolist() == [True, True, True, False, False, False]
    # with the real tokenizer: "a girl" -> BOS a girl EOS; a very long sentence is truncated with EOS at 76
    ids = model.tokenize(["a girl", "a girl standing in the snow", " ".join(["girl"] * 100)])
    assert E.eos_positions(ids, model.tokenizer.eos_token_id).tolist() == [3, 7, 76]


def test_builtin_prompts_are_single_token_words(model):
    sentences = E.builtin_sentences(model.tokenizer, size=200)
    assert len(sentences) == 200 == len(set(sentences))
    assert sentences == E.builtin_sentences(model.tokenizer, size=200)  # deterministic
    for s in sentences[:50]:
        assert E.token_count(model.tokenizer, s) == len(s.split())
    words = E.template_word_sentences(model.tokenizer)
    assert len(words) >= 10 and E.template_word_index(model.tokenizer) == 5
    ids = model.tokenize(words)
    word_ids = [model.tokenizer(w.split()[-1], add_special_tokens=False).input_ids[0] for w in words]
    assert ids[:, 5].tolist() == word_ids


def test_verdict_rule():
    assert E.verdict(0.05, 0.2, 100)["supported"] is True  # below the absolute threshold
    assert E.verdict(0.25, 0.2, 100)["supported"] is True  # within 1.5 x EOS
    v = E.verdict(0.35, 0.2, 100)
    assert v["supported"] is False and v["limit"] == pytest.approx(0.3) and "NOT SUPPORTED" in v["line"]
    assert E.verdict(0.05, 0.2, 5)["label"] == "inconclusive"
    assert "threshold = 0.1" in v["rule"]


def test_centre_file_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centre, gamma, beta = torch.randn(77, 32, generator=gen), torch.rand(32, generator=gen), torch.randn(32, generator=gen)
    meta = {"model": {"path": "/x", "text_encoder_hash": "abc"}, "clip_skip": 2, "prompt_set": {"size": 3}, "note": "é"}
    path = save_centre_file(tmp_path / "c.safetensors", centre, gamma, beta, meta, extra_tensors={"eos_centre": beta * 2})
    loaded = load_centre_file(path, expected_dim=32)
    assert torch.equal(loaded.centre, centre) and torch.equal(loaded.gamma, gamma) and torch.equal(loaded.beta, beta)
    assert loaded.centre.dtype == torch.float32 and loaded.metadata == meta
    assert torch.equal(loaded.extra["eos_centre"], beta * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # atomic: no temporary file left
    # the pivot-locality plugin reads the tensor named 'centre' ([77, d])
    from safetensors.torch import load_file

    assert load_file(str(path))["centre"].shape == (77, 32)
    with pytest.raises(CentreFileError, match=r"c\.safetensors.*width 32.*768"):
        load_centre_file(path, expected_dim=768)
    from safetensors.torch import save_file

    save_file({"center_wrong": centre}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CentreFileError, match=r"bad\.safetensors.*missing"):
        load_centre_file(tmp_path / "bad.safetensors")
    with pytest.raises(CentreFileError, match=r"d\.safetensors.*layernorm_gamma"):
        save_centre_file(tmp_path / "d.safetensors", centre, torch.ones(31), beta, {})
    with pytest.raises(CentreFileError, match="not found"):
        load_centre_file(tmp_path / "none.safetensors")


def test_reads_coco_json_and_text_file(tmp_path):
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 1, "caption": "A girl standing in the snow. "},
        {"image_id": 1, "id": 2, "caption": "a red boy"},
    ]}))
    assert E.read_sentences(coco) == ["A girl standing in the snow.", "a red boy"]
    text = tmp_path / "sentences.txt"
    text.write_text("a girl in the city\n\n  a boy on the beach  \n")
    assert E.read_sentences(text) == ["a girl in the city", "a boy on the beach"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        E.read_sentences(bad)


def test_prompt_set_options(model, tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"a girl {i}" for i in range(30)))
    base = E.build_prompt_set(model.tokenizer, text)
    assert base.sentences[0] == "a girl 0" and len(base.sentences) == 30 and base.name == "file:s.txt"
    both = E.build_prompt_set(model.tokenizer, text, template_words="add", max_sentences=20)
    assert len(both.sentences) == 20 and "T(word)" in both.name and both.hash != base.hash
    only = E.build_prompt_set(model.tokenizer, None, template_words="only")
    assert all(s.startswith("an anime illustration of ") for s in only.sentences)


def test_script_end_to_end(tiny_model, tmp_path):
    """The CLI on the tiny model with a COCO-style JSON plus T(word) prompts writes its three files."""
    coco = tmp_path / "captions.json"
    captions = [f"a {c} {p} {pose} in the {place}" for c in ("red", "blue", "green") for p in ("girl", "boy")
                for pose in ("standing", "sitting") for place in ("snow", "city", "forest")]
    coco.write_text(json.dumps({"annotations": [{"caption": c} for c in captions]}))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PTI_PLUGIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "ellipsoid_check.py"), "--model", str(tiny_model),
         "--sentences", str(coco), "--template_words", "--max_sentences", "40", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("VERDICT: ")
    report = json.loads((out / "ellipsoid.json").read_text())
    for key in ("index", "cv_about_centre", "eos_cv_about_centre", "layernorm_whitened_norm_ratio", "per_index",
                "verdict", "rule", "threshold"):
        assert key in report, key
    assert report["index"] == 5 and report["num_sentences"] == 40
    assert abs(report["layernorm_whitened_norm_ratio"] - 1) < 1e-3
    assert len(report["per_index"]["centre_cv"]) == 77
    assert (out / "ellipsoid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    centre = load_centre_file(out / "centre.safetensors", expected_dim=32)
    assert centre.centre.shape == (77, 32)
    assert centre.metadata["prompt_set"]["size"] == 40 and centre.metadata["clip_skip"] == 1
    assert centre.metadata["model"]["text_encoder_hash"] == report["model"]["text_encoder_hash"]
    assert sorted(p.name for p in out.iterdir()) == ["centre.safetensors", "ellipsoid.json", "ellipsoid.png"]
