"""The metrics library: attention capture is transparent, localisation finds a known blob, layout
distances and the leakage score behave as documented, knees, LoRA norms, and the CLIP path (a tiny
random local CLIP model) on a short trained run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pti_plugin.config_loading import build_config
from pti_plugin.metrics.attention_capture import capture_cross_attention, cross_attention_modules, subject_weights
from pti_plugin.metrics.knee import knee_index
from pti_plugin.metrics.leakage import layout_distance_matrix, leakage_score, point_distance_matrix
from pti_plugin.metrics.localisation import heatmap_stats, layout_distribution, resample
from pti_plugin.metrics.movement import lora_delta_norm
from pti_plugin.metrics.prompts import fill, normalise_prompt, subject_positions


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained_run(tiny_model, tiny_dataset, tmp_path_factory) -> Path:
    """A 2 + 2 step run on the tiny model (pivot and LoRA both moved)."""
    from pti_plugin.trainer import Trainer

    out = tmp_path_factory.mktemp("metrics_run")
    raw = {
        "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
        "output_dir": str(out), "train_batch_size": 2, "max_train_steps": 2, "log_every_n_steps": 1,
        "network_dim": 4, "network_alpha": 4.0,
        "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2},
                   {"name": "lora", "kind": "lora", "learning_rate": 2e-2}],
    }
    Trainer(build_config(raw)).run()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


@pytest.fixture(scope="module")
def loaded(trained_run):
    from pti_plugin.metrics.run_model import load_run

    return load_run(trained_run, device="cpu")


# ---------------------------------------------------------------------- capture is transparent
def test_capture_leaves_unet_output_bit_identical(loaded):
    unet = loaded.pipe.unet  # the diffusers UNet with the run's LoRA loaded (peft layers in to_q/to_k)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([100, 700])
    cond = loaded.encode([loaded.prompt("{T}", True), loaded.prompt("{T} in the snow", True)])
    originals = [m.processor for _, m in cross_attention_modules(unet)]
    references = []
    with torch.no_grad():
        for lora_on in (True, False):
            with loaded.lora(lora_on):
                reference = unet(x, t, encoder_hidden_states=cond).sample
                references.append(reference)
                with capture_cross_attention(unet, subject_weights([[5], [5]])) as collector:
                    captured = unet(x, t, encoder_hidden_states=cond).sample
                assert torch.equal(reference, captured)
                assert collector.calls == len(originals) == 16  # SD1.5 layout: 16 transformer blocks
                maps = collector.heatmaps((16, 16))
                assert maps.shape == (2, 16, 16) and torch.all(maps >= 0) and torch.all(maps <= 1)
    assert [m.processor for _, m in cross_attention_modules(unet)] == originals  # restored
    assert (references[0] - references[1]).abs().max() > 1e-4  # the switch really turns the trained LoRA off


def test_capture_records_only_the_calls_in_its_timestep_range(loaded):
    """Two UNet calls (t 100, then 700) under a range holding only 100: the maps are those of the t 100 call alone."""
    unet = loaded.pipe.unet
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cond = loaded.encode([loaded.prompt("{T}", True)] * 2)
    weights = subject_weights([[5], [5]])
    with torch.no_grad():
        with capture_cross_attention(unet, weights) as alone:
            unet(x, torch.tensor([100, 100]), encoder_hidden_states=cond)
        with capture_cross_attention(unet, weights, timestep_range=(0, 500)) as gated:
            unet(x, torch.tensor([100, 100]), encoder_hidden_states=cond)
            unet(x, timestep=torch.tensor([700, 700]), encoder_hidden_states=cond)
        with capture_cross_attention(unet, weights, timestep_range=(800, 900)) as outside:
            unet(x, torch.tensor([100, 100]), encoder_hidden_states=cond)
    assert gated.calls == alone.calls == 16 and outside.calls == 0
    assert torch.equal(gated.heatmaps((16, 16)), alone.heatmaps((16, 16)))
    assert not unet._forward_pre_hooks  # the gate left with the block


def test_one_resolution_s_maps_are_its_layers_alone_and_all_layers_weigh_each_call_equally():
    """Two calls at 4x4 and one at 2x2 for a 4x4 latent: a resolution's map is the mean of its own calls'
    maps; all layers together are the mean over the three calls, the 2x2 one (constant) upsampled."""
    from pti_plugin.metrics.attention_capture import TokenAttentionCollector

    collector = TokenAttentionCollector(torch.tensor([[0.0, 1.0, 0.0]]))  # the subject is key token 1

    def probs(subject_mass: torch.Tensor) -> torch.Tensor:  # [N] -> [1, 2 heads, N, 3 keys], each row sums to 1
        p = torch.stack([1 - subject_mass, subject_mass, torch.zeros_like(subject_mass)], dim=-1)
        return p[None, None].expand(1, 2, -1, -1).clone()

    first, second = torch.linspace(0.0, 0.6, 16), torch.linspace(0.6, 0.0, 16)
    collector.add(probs(first))
    collector.add(probs(torch.full((4,), 0.9)))
    collector.add(probs(second))
    assert collector.resolutions == [16, 4]
    fine = collector.heatmaps((4, 4), pixels=16)[0]
    assert torch.allclose(fine, ((first + second) / 2).reshape(4, 4))
    assert torch.allclose(collector.heatmaps((4, 4), pixels=4)[0], torch.full((4, 4), 0.9))
    assert torch.allclose(collector.heatmaps((4, 4))[0], ((first + second + 0.9) / 3).reshape(4, 4))
    with pytest.raises(ValueError, match=r"64 positions.*recorded: \[16, 4\]"):
        collector.heatmaps((4, 4), pixels=64)


def test_resolution_heatmaps_come_from_the_same_sampling_as_the_all_layer_ones(loaded):
    """Same images; weighting each resolution's map by its number of cross-attention layers (counted with
    hooks on the UNet, not by the collector) gives back the all-layer heatmap."""
    from pti_plugin.metrics.localisation import generate_with_heatmaps, generate_with_resolution_heatmaps

    seeds = [0, 1]
    images, all_layers = generate_with_heatmaps(loaded, "{} on a beach", True, seeds, steps=2, guidance=3.0)
    same_images, by_resolution = generate_with_resolution_heatmaps(loaded, "{} on a beach", True, seeds, steps=2,
                                                                   guidance=3.0)
    assert np.array_equal(images, same_images)
    layers: dict[int, int] = {}  # query positions -> cross-attention layers at that resolution

    def count(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, N, C] or [B, C, H, W]
        n = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
        layers[n] = layers.get(n, 0) + 1

    hooks = [m.register_forward_pre_hook(count, with_kwargs=True) for _, m in cross_attention_modules(loaded.pipe.unet)]
    with torch.no_grad():
        loaded.pipe.unet(torch.zeros(1, 4, 16, 16), torch.tensor([500]), loaded.encode([loaded.prompt("{T}", True)]))
    for hook in hooks:
        hook.remove()
    assert sorted(by_resolution, reverse=True) == list(by_resolution) == sorted(layers, reverse=True)
    weighted = sum(layers[n] * maps for n, maps in by_resolution.items()) / sum(layers.values())
    assert all_layers.shape == (2, 16, 16) and torch.allclose(weighted, all_layers, atol=1e-6)


def test_leakage_by_resolution_is_read_from_the_scores_own_sampling(loaded, monkeypatch):
    """``by_resolution``: the pipeline runs once per prompt and model, as without it; the score and every
    summary are bit-identical to a measurement without it; the per-resolution scores of the neutral prompts do
    not depend on the edit prompts measured beside them (the same as measuring the neutral prompts alone)."""
    from pti_plugin.metrics.leakage import leakage_by_resolution, measure_position_leakage

    calls = []
    pipe_class = type(loaded.pipe)
    original = pipe_class.__call__
    monkeypatch.setattr(pipe_class, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    args = (loaded, ["{} on a beach"], ["{} at the top left"], [0, 1])
    plain = measure_position_leakage(*args, steps=2, guidance=3.0)
    sampled_plain = len(calls)
    levels = measure_position_leakage(*args, steps=2, guidance=3.0, by_resolution=True)
    assert sampled_plain == len(calls) - sampled_plain == 4  # 2 prompts x 2 models, both times
    assert plain.by_resolution == {} and levels.summary == plain.summary
    assert all(torch.equal(levels.heatmaps[m], plain.heatmaps[m]) for m in ("base", "tuned"))
    assert list(levels.by_resolution) == ["16x16", "8x8", "4x4", "2x2"]
    alone = leakage_by_resolution(loaded, ["{} on a beach"], [0, 1], steps=2, guidance=3.0, all_layers=True)
    assert {k: v for k, v in alone.items() if k != "all"} == levels.by_resolution
    assert alone["all"] == plain.summary["heatmap"]["neutral"]


@pytest.mark.parametrize("down, mid", [
    (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), "UNetMidBlock2DCrossAttn"),
    (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), "UNetMidBlock2DCrossAttn"),  # SDXL's layout
    (("CrossAttnDownBlock2D", "DownBlock2D"), None),
])
def test_cross_attention_sides_are_the_sides_the_unet_attends_at(down, mid):
    """For tiny UNets of several block layouts, the sides named from the config are the square roots of the
    query positions that hooks on the built model's cross-attention modules see in a forward pass."""
    from diffusers import UNet2DConditionModel

    from pti_plugin.metrics.attention_capture import cross_attention_sides

    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    config = {"sample_size": 12, "in_channels": 4, "out_channels": 4, "down_block_types": down, "up_block_types": up,
              "mid_block_type": mid, "block_out_channels": (8,) * len(down), "layers_per_block": 1,
              "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4}
    unet = UNet2DConditionModel(**config)
    seen: list[int] = []

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3])

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for _, m in cross_attention_modules(unet)]
    with torch.no_grad():
        unet(torch.zeros(1, 4, 12, 12), torch.tensor([10]), torch.zeros(1, 3, 8))
    for hook in hooks:
        hook.remove()
    assert cross_attention_sides(unet.config) == tuple(sorted({math.isqrt(n) for n in seen}, reverse=True))
    assert all(math.isqrt(n) ** 2 == n for n in seen)


def test_subject_positions_and_prompts():
    assert normalise_prompt("{T} in the snow", "an anime illustration of {}", "tok1") == "an anime illustration of {} in the snow"
    assert normalise_prompt("tok1 on the beach", "x {}", "tok1") == "{} on the beach"
    assert fill("an anime illustration of {} in the snow", "") == "an anime illustration of in the snow"
    with pytest.raises(ValueError):
        normalise_prompt("no subject here", "{}", "tok1")
    ids = torch.tensor([49406, 10, 11, 12, 13, 99, 98, 49407])
    assert subject_positions(ids, [99, 98]) == [5, 6]
    with pytest.raises(ValueError):
        subject_positions(ids, [7])


# ---------------------------------------------------------------------- localisation of a known blob
class _TwoLevels(torch.nn.Module):
    """Two cross-attention layers at 16x16 and 8x8 (named like a UNet's ``attn2``)."""

    def __init__(self, channels: int):
        super().__init__()
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        self.high = torch.nn.Module()
        self.low = torch.nn.Module()
        for holder in (self.high, self.low):
            attn = Attention(channels, cross_attention_dim=channels, heads=1, dim_head=channels, bias=False)
            with torch.no_grad():  # q = hidden state, k = token embedding: the blob's pixels match token 5
                attn.to_q.weight.copy_(torch.eye(channels))
                attn.to_k.weight.copy_(torch.eye(channels))
            attn.set_processor(AttnProcessor2_0())
            holder.attn2 = attn


def _blob_features(size: int, cx: float, cy: float, radius: float, channels: int) -> torch.Tensor:
    """``[1, size*size, channels]``: channel 0 = 6 inside a disc (centre in image fractions), else 0."""
    ys, xs = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    inside = ((xs - cx) ** 2 + (ys - cy) ** 2) <= radius**2
    feats = torch.zeros(size * size, channels)
    feats[:, 0] = 6.0 * inside.reshape(-1).float()
    return feats[None]


def test_localisation_of_a_synthetic_blob():
    channels, cx, cy = 8, 0.28, 0.66
    model = _TwoLevels(channels)
    context = torch.zeros(1, 77, channels)
    context[0, 5, 0] = 4.0  # token 5 (tok1) attends to channel 0
    with torch.no_grad(), capture_cross_attention(model, subject_weights([[5]])) as collector:
        for holder, size in ((model.high, 16), (model.low, 8)):
            holder.attn2(_blob_features(size, cx, cy, 0.16, channels), encoder_hidden_states=context)
    assert collector.calls == 2 and set(collector.sums) == {256, 64}
    heat = collector.heatmaps((16, 16))[0]
    stats = heatmap_stats(heat)
    assert abs(stats.x - cx) < 0.03 and abs(stats.y - cy) < 0.03
    assert stats.spread < 0.2
    # Analytic check of centroid/spread on a Gaussian blob.
    ys, xs = torch.meshgrid((torch.arange(32) + 0.5) / 32, (torch.arange(32) + 0.5) / 32, indexing="ij")
    gauss = torch.exp(-((xs - 0.7) ** 2 + (ys - 0.3) ** 2) / (2 * 0.05**2))
    stats = heatmap_stats(gauss + 0.2)  # a constant floor does not move the centroid (min-subtracted)
    assert abs(stats.x - 0.7) < 1e-3 and abs(stats.y - 0.3) < 1e-3
    assert abs(stats.spread - 0.05 * math.sqrt(2)) < 5e-3


# ---------------------------------------------------------------------- distances and the score
def _point(size: int, x: int, y: int) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[y, x] = 1.0
    return m


def test_layout_distance_and_leakage_score():
    a, b, c = _point(8, 1, 1), _point(8, 1, 5), _point(8, 7, 7)
    p = resample(torch.stack([a, b, c]), 8)
    d = layout_distance_matrix(p, p)
    assert np.allclose(np.diag(d), 0, atol=1e-12)
    assert d[0, 1] == pytest.approx(4 / 8)  # point masses: their Euclidean distance in image fractions
    assert d[0, 2] == pytest.approx(math.hypot(6, 6) / 8)
    assert np.allclose(d, d.T)
    blur = layout_distribution(a + 0.5 * (_point(8, 2, 1) + _point(8, 1, 2) + _point(8, 0, 1) + _point(8, 1, 0)))
    assert 0 < layout_distance_matrix(resample(blur[None], 8), p[:1])[0, 0] < d[0, 2]  # graded, not saturated
    assert np.allclose(point_distance_matrix(np.array([[0, 0]]), np.array([[3, 4]])), 5)
    s = leakage_score(div_tuned=0.1, div_base=0.4, attr_tuned=0.2, attr_base=0.2)
    assert s["diversity_ratio"] == pytest.approx(0.25) and s["leakage_score"] == pytest.approx(0.5)
    assert leakage_score(0.4, 0.4, 0.2, 0.2)["leakage_score"] == pytest.approx(0.0)
    assert leakage_score(0.0, 0.4, 0.2, 0.2)["leakage_score"] == pytest.approx(1.0)
    assert math.isnan(leakage_score(0.1, 0.0, 0.2, 0.2)["leakage_score"])


def test_knee():
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    y = [0, 5, 8, 9, 9.3, 9.5, 9.6, 9.7]  # saturating: the bend is at x = 3
    assert x[knee_index(x, y)] == 3
    assert x[knee_index(x, [-v for v in y])] == 3  # falling curves too
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1]
    assert lrs[knee_index(lrs, [0, 0.1, 0.2, 5, 10], log_x=True)] == 1e-2
    assert knee_index([1, 2], [3, 4]) is None and knee_index([1, 2, 3], [1, 1, 1]) is None


def test_lora_delta_norm(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors, expected = {}, {"unet": 0.0, "te": 0.0}
    for prefix, rank, alpha, part in (("lora_unet_a", 2, 1.0, "unet"), ("lora_unet_b", 4, 4.0, "unet"), ("lora_te_c", 2, 8.0, "te")):
        down, up = torch.randn(rank, 6, generator=gen), torch.randn(5, rank, generator=gen)
        tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": torch.tensor(alpha)}
        expected[part] += float(((alpha / rank) * up @ down).norm() ** 2)
    tensors["bundle_emb.tok1.string_to_param.*"] = torch.randn(1, 6)
    save_file(tensors, tmp_path / "l.safetensors")
    got = lora_delta_norm(tmp_path / "l.safetensors")
    assert got["lora_delta_norm_unet"] == pytest.approx(math.sqrt(expected["unet"]), rel=1e-6)
    assert got["lora_delta_norm_te"] == pytest.approx(math.sqrt(expected["te"]), rel=1e-6)
    assert got["lora_delta_norm"] == pytest.approx(math.sqrt(expected["unet"] + expected["te"]), rel=1e-6)


# ---------------------------------------------------------------------- the measurements on a run
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIPModel (32 px images) saved as a local folder with tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from pti_plugin.models.word_vocab import write_tokenizer_files

    out = tmp_path_factory.mktemp("tiny_clip")
    write_tokenizer_files(("snow", "beach"), out)
    tokenizer = CLIPTokenizer.from_pretrained(out, local_files_only=True)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_measurements_on_a_run(loaded, tiny_clip, trained_run):
    from pti_plugin.metrics.clip_scores import ClipScorer
    from pti_plugin.metrics.editability import edit_reference_text, measure_editability
    from pti_plugin.metrics.movement import output_space_angles
    from pti_plugin.metrics.probes import make_probes
    from pti_plugin.metrics.reconstruction import clip_image_similarity, measure_reconstruction

    # Proxies (no CLIP): labelled, finite; the base model's editability is 1 by construction.
    probes = make_probes(loaded, max_images=2, timestep_fractions=(0.3, 0.7))
    assert len(probes) == 4
    rec = measure_reconstruction(loaded, probes=probes)
    assert rec["reconstruction_metric"] == "proxy_denoise_mse" and not rec["reconstruction_higher_is_better"]
    assert math.isfinite(rec["reconstruction"]) and math.isfinite(rec["reconstruction_base"])
    edit = measure_editability(loaded, edit_prompts=["{T} in the snow"], probes=probes)
    assert edit["editability_metric"] == "proxy_edit_direction_cos" and -1 <= edit["editability"] <= 1
    angles = output_space_angles(loaded)
    assert angles["output_angle_layernorm_deg"] > 0  # the pivot moved away from "character"

    # CLIP path with a local (random) CLIP model: the TI protocol's texts and similarities.
    scorer = ClipScorer(tiny_clip, device="cpu")
    images = loaded.training_images_uint8()
    emb = scorer.image_embeddings(images)
    assert emb.shape == (4, 8) and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert clip_image_similarity(scorer, images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    assert edit_reference_text(loaded, "{T} in the snow") == "an anime illustration of in the snow"
    rec = measure_reconstruction(loaded, scorer, seeds=[0, 1], steps=2)
    assert rec["reconstruction_metric"] == "clip_image_image" and -1 <= rec["reconstruction"] <= 1
    edit = measure_editability(loaded, scorer, edit_prompts=["{T} in the snow"], seeds=[0, 1], steps=2)
    assert edit["editability_metric"] == "clip_text_image" and -1 <= edit["editability_base"] <= 1


def test_correlation_pearson_spearman_and_ties():
    from pti_plugin.metrics.correlation import correlation, ranks

    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert correlation(x, [2 * v + 1 for v in x]) == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0), "n": 5}
    assert correlation(x, [-v for v in x])["pearson"] == pytest.approx(-1.0)
    exponential = correlation(x, [10.0**v for v in x])
    assert exponential["spearman"] == pytest.approx(1.0) and exponential["pearson"] < 0.8  # monotone, not linear
    assert ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    # r of (1,2,3,4) with (1,3,2,4) = 0.8, by hand
    assert correlation([1, 2, 3, 4], [1, 3, 2, 4])["pearson"] == pytest.approx(0.8)
    dropped = correlation([1.0, None, 2.0, float("nan"), 3.0], [1.0, 5.0, 2.0, 1.0, 3.0])
    assert dropped["n"] == 3 and dropped["pearson"] == pytest.approx(1.0)
    assert math.isnan(correlation([1, 2, 3], [4, 4, 4])["pearson"])  # a constant side
    assert math.isnan(correlation([1, 2], [1, 2])["spearman"])  # below 3 pairs


def test_layer_scores_measure_each_resolution_and_cache_them(trained_run, loaded):
    import argparse

    from pti_plugin.metrics.leakage import measure_position_leakage
    from pti_plugin.protocol.internal_metrics import ALL_LAYERS, LAYER_VERSIONS, LAYERS_FILE, layer_scores
    from pti_plugin.toy_world.run_scores import NEUTRAL_PROMPTS, POSITION_EDIT_PROMPTS

    scoring = argparse.Namespace(seeds=2, sample_steps=2, guidance=3.0, device="cpu", rescore=False)
    scores = layer_scores(trained_run, scoring)
    assert set(scores) == set(LAYER_VERSIONS) | {ALL_LAYERS}  # the tiny model has the toy world's 16, 8, 4 and 2 levels
    assert all(isinstance(v, float) and v == v for v in scores.values())
    # the all-layer score from the layer sampling is the scorer's attention_leakage, computed as the scorer does: the
    # neutral prompts with position-edit prompts beside them (one here: the neutral prompts' scores do not depend on
    # the edit prompts beside them, test_leakage_by_resolution_is_read_from_the_scores_own_sampling)
    scorer = measure_position_leakage(loaded, list(NEUTRAL_PROMPTS), list(POSITION_EDIT_PROMPTS[:1]), [0, 1], 2, 3.0)
    assert scores[ALL_LAYERS] == pytest.approx(scorer.summary["heatmap"]["neutral"]["leakage_score"], abs=1e-12)
    assert layer_scores(trained_run, scoring, cached_only=True) == scores  # read back, nothing computed
    other = argparse.Namespace(**vars(scoring) | {"seeds": 3})
    assert layer_scores(trained_run, other, cached_only=True) is None  # other settings: no cache
    (trained_run / LAYERS_FILE).unlink()


def test_band_scores_measure_and_cache_the_band_version(trained_run):
    import argparse

    from pti_plugin.protocol.internal_metrics import BAND_FILE, band_scores

    scoring = argparse.Namespace(seeds=2, sample_steps=2, guidance=3.0, device="cpu", rescore=False)
    band = (400, 999)  # 2 DDIM steps: only the first (t 501) is in the band
    scores = band_scores(trained_run, scoring, band)
    assert set(scores) == {"attention_leakage_band", "centroid_neutral_leakage_score_band"}
    assert all(isinstance(v, float) and v == v for v in scores.values())
    assert band_scores(trained_run, scoring, band, cached_only=True) == scores  # read back, nothing computed
    assert band_scores(trained_run, scoring, (0, 10), cached_only=True) is None  # other settings: no cache
    (trained_run / BAND_FILE).unlink()


def test_a_training_log_line_cut_short_by_a_crash_is_left_out_with_a_warning(tmp_path, caplog):
    """The log is appended line by line, so a crash can leave half a line; the evaluation read it with
    json.loads and failed with a traceback. Now the last whole entry (of the stage asked) is used."""
    import json
    import logging

    from pti_plugin.metrics.evaluate import final_log_entry

    log = tmp_path / "pti.log.jsonl"
    log.write_text(json.dumps({"stage": "inversion", "step": 1}) + "\n" + json.dumps({"stage": "lora", "step": 2})
                   + "\n[1, 2]\n" + '{"stage": "lora", "st')
    with caplog.at_level(logging.WARNING, logger="pti_plugin.outputs"):
        assert final_log_entry(log) == {"stage": "lora", "step": 2}
        assert final_log_entry(log, "inversion") == {"stage": "inversion", "step": 1}
    assert f"{log} line 4 is not a JSON object" in caplog.text and f"{log} line 3 is not a JSON object" in caplog.text
