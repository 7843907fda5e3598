"""Pivot locality: the interpolation geometry, and the regulariser end to end on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pti_plugin import geometry
from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.plugins.pivot_locality import PivotLocality
from pti_plugin.trainer import Trainer

register_plugin(PivotLocality)  # until it is listed among the built-ins


# ---------------------------------------------------------------------------------------------- geometry
def _rows(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_slerp_endpoints_exact_and_angle_linear_in_fraction():
    a, b = _rows(0, 16, 48), 3 * _rows(1, 16, 48)
    assert torch.equal(geometry.slerp(a, b, 0.0), a) and torch.equal(geometry.slerp(a, b, 1.0), b)
    full = geometry.angle(a, b)
    assert bool((full > 0.5).all())  # random directions in 48-d: far from degenerate
    for t in (0.25, 0.5, 0.75):
        point = geometry.slerp(a, b, t)
        assert torch.allclose(geometry.angle(a, point), t * full, atol=1e-5)
        assert torch.allclose(geometry.angle(point, b), (1 - t) * full, atol=1e-5)
        assert torch.allclose(point.norm(dim=-1), (1 - t) * a.norm(dim=-1) + t * b.norm(dim=-1), rtol=1e-5)
    # one fraction per row
    t = torch.linspace(0, 1, 16)
    assert torch.allclose(geometry.angle(a, geometry.slerp(a, b, t)), t * full, atol=1e-5)
    # equal norms stay equal along the path
    c = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)
    assert torch.allclose(geometry.slerp(a, c, 0.3).norm(dim=-1), a.norm(dim=-1), rtol=1e-6)


def test_slerp_degenerate_cases_have_no_nan():
    a = _rows(2, 4, 8)
    for b in (a.clone(), 2 * a, -a, torch.zeros_like(a)):  # identical, parallel, antiparallel, zero
        out = geometry.slerp(a, b, 0.5)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, 0.5 * (a + b), atol=1e-6)  # lerp fallback
    assert torch.equal(geometry.slerp(a, a.clone(), 0.5), a)
    assert torch.isfinite(geometry.angle(a, torch.zeros_like(a))).all()


def test_layernorm_slerp_stays_on_the_layernorm_manifold():
    d = 64
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.copy_(0.5 + _rows(3, d).abs())
        norm.bias.copy_(_rows(4, d))
    # Pre-LayerNorm states with different means and scales (variance >= 1, as CLIP's: LayerNorm's eps then
    # shrinks the norm of xhat below sqrt(d) by less than 1e-5 relative).
    x_a = 4 * _rows(5, 3, 77, d) + 2
    x_b = 1.5 * _rows(6, 3, 77, d) - 1
    x_b[:, :5] = x_a[:, :5]  # positions before the token are identical (causal attention)
    xa, xb = (geometry.normalise_like_layernorm(x, norm.eps) for x in (x_a, x_b))
    gamma, beta = norm.weight.detach(), norm.bias.detach()
    with torch.no_grad():
        assert torch.allclose(geometry.layernorm_slerp(xa, xb, 0.0, gamma, beta), norm(x_a), atol=1e-5)
        assert torch.allclose(geometry.layernorm_slerp(xa, xb, 1.0, gamma, beta), norm(x_b), atol=1e-5)
    for t in (0.1, 0.5, 0.9):
        h = geometry.layernorm_slerp(xa, xb, t, gamma, beta)
        u = (h - beta) / gamma  # whitened: must have norm sqrt(d) and zero mean, like a real LayerNorm output
        assert (u.norm(dim=-1) - math.sqrt(d)).abs().max() < 1e-4
        assert u.mean(dim=-1).abs().max() < 1e-4
        low, high = torch.minimum(xa.norm(dim=-1), xb.norm(dim=-1)), torch.maximum(xa.norm(dim=-1), xb.norm(dim=-1))
        assert bool((u.norm(dim=-1) >= low - 1e-5).all() and (u.norm(dim=-1) <= high + 1e-5).all())
        assert torch.equal(h[:, :5], geometry.layernorm_slerp(xa, xb, 0.0, gamma, beta)[:, :5])
        half = geometry.layernorm_angle(xa, xb)[:, 5:]
        assert torch.allclose(geometry.layernorm_angle(xa, u)[:, 5:], t * half, atol=1e-4)


def test_centered_slerp_interpolates_radius_linearly():
    centre = 5 + _rows(7, 32)
    h_a, h_b = centre + 2 * _rows(8, 6, 32), centre + 0.5 * _rows(9, 6, 32)
    ra, rb = (h_a - centre).norm(dim=-1), (h_b - centre).norm(dim=-1)
    full = geometry.centered_angle(h_a, h_b, centre)
    for t in (0.0, 0.3, 0.5, 1.0):
        h = geometry.centered_slerp(h_a, h_b, t, centre)
        assert torch.allclose((h - centre).norm(dim=-1), (1 - t) * ra + t * rb, rtol=1e-5)
        assert torch.allclose(geometry.centered_angle(h_a, h, centre), t * full, atol=1e-5)
    assert torch.allclose(geometry.centered_slerp(h_a, h_b, 1.0, centre), h_b, atol=1e-6)
    assert torch.allclose(geometry.lerp(h_a, h_b, 0.25), 0.75 * h_a + 0.25 * h_b)


# ---------------------------------------------------------------------------------------------- end to end
@register_plugin
class LocalityProbe(Plugin):
    """At the end of a run, measures |eps_lora - eps_frozen| at interpolated conditionings and records the state."""

    name = "test_locality_probe"
    records: list = []

    def on_end(self, state):
        probe = PivotLocality(PivotLocality.Options())
        probe.on_setup(state)
        deviation = probe.deviation(state, [0.25, 0.5, 0.75], (4, 16, 16), num_latents=4)
        LocalityProbe.records.append({"state": state, "probe": probe, "deviation": deviation})


@register_plugin
class RecordingLocality(PivotLocality):
    """pivot_locality that keeps what its rows bring to the UNet call (conditioning, noisy latents,
    timesteps) beside the batch's clean latents and timesteps, one record per call."""

    name = "test_recording_locality"
    seen: list = []

    def extra_rows(self, state, batch):
        rows = super().extra_rows(state, batch)
        if rows is not None:
            RecordingLocality.seen.append({"conditioning": rows.conditioning.hidden_states.detach().clone(),
                                           "noisy": rows.noisy_latents.detach().clone(),
                                           "timesteps": rows.timesteps.clone(), "clean": batch.latents.detach().clone()})
        return rows


def _log(raw) -> list[dict]:
    return [json.loads(line) for line in (Path(raw["output_dir"]) / "pti.log.jsonl").read_text().splitlines()]


def test_regulariser_keeps_lora_local_and_leaves_inversion_alone(preset, tmp_path, tiny_model):
    stages = [{"name": "inversion", "kind": "inversion", "steps": 2, "learning_rate": 5e-2},
              {"name": "lora", "kind": "lora", "steps": 5, "learning_rate": 2e-2}]
    LocalityProbe.records = []
    off = preset(output_dir=str(tmp_path / "off"), stages=stages, plugins={"test_locality_probe": {}})
    on = off | {"output_dir": str(tmp_path / "on"),
                "plugins": {"pivot_locality": {"weight": 100.0, "fractions": [0.25, 0.5, 0.75]}, "test_locality_probe": {}}}
    Trainer(build_config(off)).run()
    outputs = Trainer(build_config(on)).run()
    without, with_ = (r["deviation"] for r in LocalityProbe.records)

    log = _log(on)
    term = "loss/pivot_locality/mse"
    assert [term in e for e in log] == [False] * 2 + [True] * 5  # inactive in the inversion stage
    # First LoRA step: the LoRA up weights are zero, so the LoRA model is the frozen one (up to the float
    # differences of a larger UNet batch when the rows ride on the main call); later steps are well above that.
    assert log[2][term] < 1e-9
    assert all(e[term] > 1e-6 for e in log[3:])
    assert log[2]["pivot_locality/fraction"] in (0.25, 0.5, 0.75)
    assert log[2]["pivot_locality/angle_layernorm_deg"] > 1 and log[2]["pivot_locality/angle_centered_deg"] > 1
    # Inversion untouched: the pivot (frozen in the LoRA stage) is bit-identical with and without the plugin.
    assert torch.equal(load_file(tmp_path / "off" / "tok1.safetensors")["emb_params"],
                       load_file(tmp_path / "on" / "tok1.safetensors")["emb_params"])
    assert log[1]["loss/main"] == _log(off)[1]["loss/main"]
    # Locality: on interpolated conditionings the LoRA model stays closer to the frozen one with the plugin.
    print("deviation without / with the plugin:", without, with_)
    for f in (0.25, 0.5, 0.75):
        assert with_[f] < 0.5 * without[f], (f, with_, without)
    with safe_open(str(outputs["lora"]), "pt") as handle:
        saved = json.loads(handle.metadata()["pti_pivot_locality"])
    assert saved["weight"] == 100.0 and saved["class_prompts"] == ["an anime illustration of character"]

    # The frozen prediction is the base UNet's, LoRA-free, after LoRA training.
    from diffusers import UNet2DConditionModel

    record = LocalityProbe.records[1]
    state, probe = record["state"], record["probe"]
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", local_files_only=True)
    noisy, t = _rows(10, 2, 4, 16, 16), torch.tensor([100, 700])
    cond = probe._interpolate(probe._compute_endpoints(state, False, False), [0, 0], [0.5, 0.5])
    with torch.no_grad():
        expected = base(noisy, t, **cond.unet_kwargs()).sample
        lora = state.model.unet(noisy, t, **cond.unet_kwargs()).sample
    assert torch.allclose(probe._frozen_prediction(state, noisy, t, cond), expected, atol=1e-5)
    assert not torch.allclose(lora, expected, atol=1e-3)  # the LoRA did move


@pytest.mark.parametrize("geometry_name", ["layernorm", "centered"])  # linear: exact by test_centered_slerp_...
def test_fraction_one_is_the_class_prompt(preset, geometry_name):
    RecordingLocality.seen = []
    raw = preset(stages=[INVERSION_STEP, {"kind": "lora", "steps": 1}], plugins={"test_recording_locality": {
        "fractions": [1.0], "latents": "noise", "num_samples": 2, "geometry": geometry_name, "probe_every_n_steps": 0}})
    LocalityProbe.records = []
    raw["plugins"]["test_locality_probe"] = {}
    Trainer(build_config(raw)).run()
    state = LocalityProbe.records[0]["state"]
    ids = state.tokenize(["an anime illustration of character"])
    with torch.no_grad():
        class_cond = state.encode(ids).hidden_states[0]
    (rows,) = [r["conditioning"] for r in RecordingLocality.seen]
    assert rows.shape == (2, 77, 32)
    assert (rows - class_cond).abs().max() < 1e-5


#: One inversion step before a lora stage: the regulariser toward the init word needs a pivot that moved.
INVERSION_STEP = {"name": "inversion", "kind": "inversion", "steps": 1, "learning_rate": 5e-2}


def test_anchor_cache_matches_uncached_loss(preset, tmp_path):
    base = {"latents": "noise", "anchor_pool": 4, "num_samples": 2, "weight": 10.0, "probe_every_n_steps": 0}
    losses = []
    for cache in (False, True):
        raw = preset(output_dir=str(tmp_path / str(cache)), stages=[INVERSION_STEP, {"kind": "lora", "steps": 3}],
                     plugins={"pivot_locality": base | {"cache_anchors": cache}})
        Trainer(build_config(raw)).run()
        losses.append([e["loss/pivot_locality/mse"] for e in _log(raw) if "loss/pivot_locality/mse" in e])
    uncached, cached = losses
    assert uncached[0] < 1e-9 and uncached[2] > 1e-6
    assert all(abs(a - b) < 1e-5 for a, b in zip(uncached, cached)), losses


def test_no_gradient_reaches_the_pivot_when_the_text_encoder_trains(preset, tmp_path):
    """Continued inversion with a text-encoder LoRA: the term trains the LoRAs (text encoder included), not the pivot."""
    stages = [{"kind": "lora", "steps": 2, "learning_rate": 1e-2, "optimizer_type": "SGD", "train_pivot": True,
               "train_text_encoder": True}]
    files = []
    for plugins in ({}, {"pivot_locality": {"weight": 100.0, "probe_every_n_steps": 0}}):
        raw = preset(output_dir=str(tmp_path / str(len(files))), stages=stages, max_grad_norm=0.0, plugins=plugins)
        outputs = Trainer(build_config(raw)).run()
        files.append((load_file(outputs["embedding"]), load_file(outputs["lora"])))
    (emb_off, lora_off), (emb_on, lora_on) = files
    assert _log(raw)[1]["loss/pivot_locality/mse"] > 1e-6
    assert _log(raw)[1]["pivot_l2_from_init"] > 1e-4  # the pivot trains (from the main loss)
    assert torch.allclose(emb_on["emb_params"], emb_off["emb_params"], atol=1e-6)
    te_keys = [k for k in lora_on if k.startswith("lora_te")]
    assert te_keys and max(float((lora_on[k].float() - lora_off[k].float()).abs().max()) for k in te_keys) > 1e-5


def test_refusals(preset, tmp_path):
    # A class word of several tokens cannot fill the single pivot slot.
    raw = preset(plugins={"pivot_locality": {"class_words": ["blue hair"]}})
    with pytest.raises(ConfigError, match=r"class word 'blue hair' is 2 tokens.*num_vectors_per_token = 2"):
        Trainer(build_config(raw)).run()
    # ... but two tokens fill two slots.
    two = preset(output_dir=str(tmp_path / "two"), num_vectors_per_token=2, stages=[{"kind": "lora", "steps": 1}],
                 plugins={"pivot_locality": {"class_words": ["blue hair"], "probe_every_n_steps": 0}})
    Trainer(build_config(two)).run()
    # The anchor cache when the text encoder trains.
    raw = preset(output_dir=str(tmp_path / "te"), network_train_unet_only=False,
                 plugins={"pivot_locality": {"latents": "noise", "anchor_pool": 4, "cache_anchors": True}})
    with pytest.raises(ConfigError, match="cache_anchors is refused in stage 'lora', which trains the text encoder"):
        Trainer(build_config(raw)).run()
    # The cache with the batch's own latents; fractions at the pivot; unknown stages.
    for options, message in (({"cache_anchors": True}, 'cache_anchors needs latents = "noise"'),
                              ({"fractions": [0.0, 0.5]}, r"fractions must lie in \(0, 1\]"),
                              ({"geometry": "spherical"}, "geometry must be")):
        with pytest.raises(ConfigError, match=message):
            Trainer(build_config(preset(output_dir=str(tmp_path / "x"), plugins={"pivot_locality": options}))).run()


def test_centre_file_is_read(preset, tmp_path, tiny_model):
    from transformers import CLIPTextModel

    from pti_plugin.centre_file import save_centre_file
    from pti_plugin.models.sd15 import final_layer_norm

    norm = final_layer_norm(CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder", local_files_only=True))
    gamma, beta = norm.weight.detach(), norm.bias.detach()
    save_centre_file(tmp_path / "centre.safetensors", torch.zeros(77, 32), gamma, beta, {"clip_skip": 1})
    RecordingLocality.seen = []
    raw = preset(stages=[INVERSION_STEP, {"kind": "lora", "steps": 1}], plugins={"test_recording_locality": {
        "geometry": "centered", "centre_file": str(tmp_path / "centre.safetensors"), "latents": "noise",
        "probe_every_n_steps": 0}, "test_locality_probe": {}})
    LocalityProbe.records = []
    Trainer(build_config(raw)).run()
    # About the origin the centred slerp is the plain slerp of the encoder outputs.
    probe, state = LocalityProbe.records[0]["probe"], LocalityProbe.records[0]["state"]
    ends = probe._compute_endpoints(state, True, False)
    (rows,) = [r["conditioning"] for r in RecordingLocality.seen]
    assert torch.allclose(rows[0], geometry.slerp(ends["h_p"][0], ends["h_c"][0], 0.5), atol=1e-5)
    # Files that do not fit this model are refused.
    save_centre_file(tmp_path / "narrow.safetensors", torch.zeros(77, 16), torch.ones(16), torch.zeros(16), {})
    save_centre_file(tmp_path / "other.safetensors", torch.zeros(77, 32), 2 * gamma, beta, {})
    save_centre_file(tmp_path / "skip2.safetensors", torch.zeros(77, 32), gamma, beta, {"clip_skip": 2})
    for name, message in (("narrow", "width 16 does not match"), ("other", "made for another model"),
                          ("skip2", "measured with clip_skip = 2")):
        bad = raw | {"output_dir": str(tmp_path / name), "plugins": {"pivot_locality": {
            "geometry": "centered", "centre_file": str(tmp_path / f"{name}.safetensors")}}}
        with pytest.raises(ConfigError, match=message):
            Trainer(build_config(bad)).run()


def test_stages_option_selects_lora_stages(preset, tmp_path):
    stages = [{"name": "inv", "kind": "inversion", "steps": 1}, {"name": "a", "kind": "lora", "steps": 2},
              {"name": "b", "kind": "lora", "steps": 2}]
    raw = preset(stages=stages, plugins={"pivot_locality": {"stages": ["b"], "probe_every_n_steps": 0}})
    Trainer(build_config(raw)).run()
    assert ["loss/pivot_locality/mse" in e for e in _log(raw)] == [False, False, False, True, True]
    with pytest.raises(ConfigError, match=r"stages \['inv'\] are inversion stages"):
        Trainer(build_config(raw | {"output_dir": str(tmp_path / "x"), "plugins": {"pivot_locality": {"stages": ["inv"]}}})).run()


@pytest.mark.parametrize("latents", ["batch", "noise"])
def test_timestep_range_puts_every_row_in_the_band(preset, tmp_path, latents):
    options = {"latents": latents, "num_samples": 3, "probe_every_n_steps": 0, "timestep_range": [850, 900]}
    RecordingLocality.seen = []
    raw = preset(output_dir=str(tmp_path / latents), stages=[INVERSION_STEP, {"kind": "lora", "steps": 3}],
                 plugins={"test_recording_locality": options})
    Trainer(build_config(raw)).run()
    assert len(RecordingLocality.seen) == 3
    for record in RecordingLocality.seen:
        t = record["timesteps"]
        assert t.shape == (3,) and bool(((t >= 850) & (t <= 900)).all())
    assert len({int(v) for r in RecordingLocality.seen for v in r["timesteps"]}) > 1  # drawn, not fixed


def test_timestep_range_renoises_the_batch_rows_clean_latents(preset, tmp_path):
    """At timestep 0 a re-noised row is (almost) its clean latents; at 999 it is (almost) pure noise."""
    found = {}
    for band in ([0, 0], [999, 999]):
        RecordingLocality.seen = []
        raw = preset(output_dir=str(tmp_path / str(band[0])), stages=[INVERSION_STEP, {"kind": "lora", "steps": 1}],
                     plugins={"test_recording_locality": {"num_samples": 1, "probe_every_n_steps": 0,
                                                         "timestep_range": band}})
        Trainer(build_config(raw)).run()
        (record,) = RecordingLocality.seen
        noisy, t, clean = record["noisy"], record["timesteps"], record["clean"]
        found[band[0]] = torch.corrcoef(torch.stack([noisy[0].flatten(), clean[0].flatten()]))[0, 1].item()
        assert int(t[0]) == band[0]
    assert found[0] > 0.99 and abs(found[999]) < 0.3, found


def test_timestep_range_refusals(preset, tmp_path):
    for band, message in (([900, 800], "timestep_range must be"), ([5], "timestep_range must be"),
                          ([0, 1000], "reaches past the schedule's last timestep")):
        raw = preset(output_dir=str(tmp_path / "x"), plugins={"pivot_locality": {"timestep_range": band}})
        with pytest.raises(ConfigError, match=message):
            Trainer(build_config(raw)).run()


@pytest.mark.parametrize("anchors", [{}, {"latents": "noise", "anchor_pool": 4, "cache_anchors": True}])
def test_text_encoders_moved_off_the_device_change_nothing(preset, tmp_path, monkeypatch, anchors):
    """On a GPU, cache_text_encoder_outputs moves the text encoders (their final LayerNorm too) to the CPU once
    the stage's captions are encoded, after the plugin's stage start. Simulated on the CPU by moving them to
    the meta device (any use of their weights then fails; the pivot's own vectors stay readable, as on the
    CPU) and back: the run must equal one where they stay."""
    from pti_plugin.models.trainable import TrainableModel
    from pti_plugin.text_cache import TextConditioningCache

    def run(name: str) -> dict[str, torch.Tensor]:
        raw = preset(output_dir=str(tmp_path / name), stages=[INVERSION_STEP, {"kind": "lora", "steps": 3}],
                     cache_text_encoder_outputs=True, save_precision="float",
                     plugins={"pivot_locality": {"num_samples": 2, "weight": 10.0, "probe_every_n_steps": 0} | anchors})
        return load_file(Trainer(build_config(raw)).run()["lora"])

    stays = run("stays")
    saved = {}

    def leaves(encoder):  # the modules holding the weights; the pivot's own tensors sit on its wrapper
        return [m for m in encoder.modules() if not list(m.children())]

    def offload(model):
        saved.update({i: {k: v.clone() for k, v in te.state_dict().items()} for i, te in enumerate(model.base.text_encoders)})
        for te in model.base.text_encoders:
            for leaf in leaves(te):
                leaf.to("meta")
        model._text_home = torch.device("cpu")

    def restore(model):
        if model._text_home is None:
            return False
        for i, te in enumerate(model.base.text_encoders):
            for leaf in leaves(te):
                leaf.to_empty(device="cpu")
            te.load_state_dict(saved[i])
        model._text_home = None
        return True

    monkeypatch.setattr(TextConditioningCache, "_can_offload", lambda self: True)
    monkeypatch.setattr(TrainableModel, "offload_text_encoders", offload)
    monkeypatch.setattr(TrainableModel, "restore_text_encoders", restore)
    moved = run("moved")
    assert saved, "the stage did not move the text encoders"
    assert stays.keys() == moved.keys() and all(torch.equal(stays[k], moved[k]) for k in stays)
