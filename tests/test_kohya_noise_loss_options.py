"""kohya's noise and loss options: min_timestep/max_timestep, noise_offset_random_strength, adaptive_noise_scale,
ip_noise_gamma(_random_strength), scale_v_pred_loss_like_noise_pred, v_pred_like_loss, debiased_estimation_loss,
loss_type with huber_schedule, huber_c and huber_scale.

Expectations are computed here from first principles (the SD schedule's SNR by hand in float64, the per-sample
generator's draws in their documented order, the forward process written out), never by calling the code under test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import DDPMScheduler

from pti_plugin.config import Config, ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.sample_order import sample_generator
from pti_plugin.diffusion_loss import (
    check_against_model,
    draw_noise,
    draw_sample,
    huber_threshold,
    per_sample_loss,
    timestep_weighted,
)
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import Trainer

STEP_TAG = 0x9015E  # the trainer's tag of the main loss's per-sample generator


def _schedule(zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The tiny model's (and SD's) training schedule."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         rescale_betas_zero_snr=zero_terminal_snr)


def _alpha_bar(t: int) -> float:
    """SD's scaled-linear alpha-bar at ``t``, by hand in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return float(torch.cumprod(1 - betas, 0)[t])


def _snr(t: int) -> float:
    return _alpha_bar(t) / (1 - _alpha_bar(t))


def _config(**kwargs) -> Config:
    return dataclasses.replace(Config(), **kwargs)


# ----------------------------------------------------------------------------- timesteps

def _timesteps(config: Config, n: int = 3000) -> set[int]:
    return {int(draw_sample((4, 2, 2), sample_generator(7, k), config, 1000)[1]) for k in range(n)}


def test_timesteps_are_drawn_in_min_inclusive_max_exclusive():
    seen = _timesteps(_config(min_timestep=300, max_timestep=310))
    assert seen == set(range(300, 310))  # 300 reached, 310 never (kohya: randint(min, max))


def test_a_range_of_one_timestep_gives_only_that_timestep():
    assert _timesteps(_config(min_timestep=700, max_timestep=701), 200) == {700}
    assert _timesteps(_config(min_timestep=700, max_timestep=700), 200) == {700}  # kohya: min == max is that timestep


def test_min_timestep_alone_keeps_the_schedule_end():
    seen = _timesteps(_config(min_timestep=995))
    assert seen == {995, 996, 997, 998, 999}


# ----------------------------------------------------------------------------- noise

def _offsets(config: Config, seeds: int, latent_abs_mean=None) -> torch.Tensor:
    """Each seed's noise offset per channel [seeds, 4]: the noise minus the generator's first draw (the base noise)."""
    rows = []
    for k in range(seeds):
        noise = draw_noise((4, 3, 3), sample_generator(3, k), config, latent_abs_mean)
        base = torch.randn((4, 3, 3), generator=sample_generator(3, k))
        offset = noise - base
        assert torch.allclose(offset, offset[:, :1, :1].expand_as(offset), atol=1e-6)  # one constant per channel
        rows.append(offset[:, 0, 0])
    return torch.stack(rows)


def test_noise_offset_random_strength_scales_the_offset_by_a_uniform_draw():
    fixed = _offsets(_config(noise_offset=0.1), 600).abs().mean()
    scaled = _offsets(_config(noise_offset=0.1, noise_offset_random_strength=True), 600).abs().mean()
    # E|0.1 z| = 0.1 sqrt(2/pi) = 0.0798; with a uniform strength in [0, 1) half of that
    assert abs(float(fixed) - 0.0798) < 0.006
    assert abs(float(scaled) - 0.0399) < 0.005


def test_adaptive_noise_scale_adds_the_latents_channel_mean_and_clamps_at_zero():
    means = torch.tensor([0.0, 2.0, 0.05, 0.0]).reshape(4, 1, 1)  # |channel mean| of a sample's latents
    plain = _offsets(_config(noise_offset=0.1), 1)[0]
    grown = _offsets(_config(noise_offset=0.1, adaptive_noise_scale=0.5), 1, means)[0]
    # strength per channel: 0.1 + 0.5 |mean| = 0.1, 1.1, 0.125, 0.1 along the same Gaussian direction
    assert torch.allclose(grown, plain * torch.tensor([1.0, 11.0, 1.25, 1.0]), rtol=1e-5)
    shrunk = _offsets(_config(noise_offset=0.1, adaptive_noise_scale=-1.0), 1, means)[0]
    # 0.1 - 2.0 < 0 clamps to no offset at all; 0.1 - 0.05 = 0.05 halves it
    assert torch.allclose(shrunk, plain * torch.tensor([1.0, 0.0, 0.5, 1.0]), rtol=1e-5, atol=1e-7)


def test_ip_noise_gamma_perturbs_the_input_noise_only_and_keeps_the_other_draws():
    shape = (4, 32, 32)
    noise_off, t_off, input_off = draw_sample(shape, sample_generator(5, 1), _config(), 1000)
    assert input_off is noise_off
    noise, t, input_noise = draw_sample(shape, sample_generator(5, 1), _config(ip_noise_gamma=0.1), 1000)
    assert torch.equal(noise, noise_off) and int(t) == int(t_off)  # its draw comes after the others
    assert abs(float((input_noise - noise).std()) - 0.1) < 0.005  # 4096 values of 0.1 x N(0, 1)
    stds = [float((s[2] - s[0]).std()) for s in (draw_sample(shape, sample_generator(5, k), _config(
        ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), 1000) for k in range(40))]
    assert max(stds) < 0.1 * 1.05 and min(stds) < 0.03 and max(stds) > 0.07  # 0.1 x uniform [0, 1)


# ----------------------------------------------------------------------------- loss weights

TIMESTEPS = (0, 500, 999)  # SNR at 0 is (1 - 0.00085) / 0.00085 = 1175.5: above kohya's cap of 1000


def _weights(prediction_type: str, **options) -> list[float]:
    ones = torch.ones(len(TIMESTEPS))
    return timestep_weighted(ones, _schedule(), torch.tensor(TIMESTEPS), _config(**options), prediction_type).tolist()


def test_debiased_estimation_weights_by_the_hand_computed_snr():
    assert _snr(0) == pytest.approx(0.99915 / 0.00085)
    capped = [min(_snr(t), 1000.0) for t in TIMESTEPS]
    assert _weights("epsilon", debiased_estimation_loss=True) == pytest.approx([1 / math.sqrt(s) for s in capped], rel=1e-4)
    assert _weights("v_prediction", debiased_estimation_loss=True) == pytest.approx([1 / (s + 1) for s in capped], rel=1e-4)
    assert _weights("epsilon") == [1.0, 1.0, 1.0]


def test_v_prediction_scalings_use_the_capped_snr():
    capped = [min(_snr(t), 1000.0) for t in TIMESTEPS]
    assert _weights("v_prediction", scale_v_pred_loss_like_noise_pred=True) == pytest.approx(
        [s / (s + 1) for s in capped], rel=1e-4)
    assert _weights("epsilon", v_pred_like_loss=0.3) == pytest.approx([1 + 0.3 * (s + 1) / s for s in capped], rel=1e-4)


# ----------------------------------------------------------------------------- loss types

def _loss(d: float, loss_type: str, **options) -> float:
    """The loss of one sample whose every element is off by ``d``."""
    prediction = torch.full((1, 4, 2, 2), d)
    config = _config(loss_type=loss_type, huber_schedule="constant", **options)
    return float(per_sample_loss(prediction, torch.zeros_like(prediction), _schedule(), torch.tensor([10]), config)[0])


def test_loss_types_are_squared_absolute_and_pseudo_huber():
    assert _loss(3.0, "l2") == pytest.approx(9.0) and _loss(-3.0, "l1") == pytest.approx(3.0)
    # pseudo-Huber with c = 0.05 x 2: about d^2 well below c, about 2c |d| well above it
    assert _loss(0.01, "huber", huber_c=0.05, huber_scale=2.0) == pytest.approx(1e-4, rel=5e-3)
    assert _loss(-50.0, "huber", huber_c=0.05, huber_scale=2.0) == pytest.approx(2 * 0.1 * 50 - 2 * 0.1**2, rel=1e-4)
    # smooth L1: d^2 / c below, 2 |d| - 2c above; and 2c (sqrt(0.1^2 + 0.1^2) - 0.1) / 0.2 at d = c
    assert _loss(0.01, "smooth_l1", huber_c=0.1) == pytest.approx(1e-3, rel=5e-3)
    assert _loss(50.0, "smooth_l1", huber_c=0.1) == pytest.approx(100 - 0.2, rel=1e-4)
    assert _loss(0.1, "smooth_l1", huber_c=0.1) == pytest.approx(0.2 * (math.sqrt(2) - 1), rel=1e-5)


def test_huber_thresholds_follow_their_schedules():
    t = torch.tensor(TIMESTEPS)
    exponential = huber_threshold(_schedule(), t, _config(huber_schedule="exponential", huber_c=0.01, huber_scale=2.0))
    assert exponential.tolist() == pytest.approx([2.0, 2.0 * 0.1, 2.0 * 0.01 ** 0.999], rel=1e-4)  # 2 x 0.01^(t / 1000)
    constant = huber_threshold(_schedule(), t, _config(huber_schedule="constant", huber_c=0.2, huber_scale=0.5))
    assert constant.tolist() == pytest.approx([0.1] * 3)
    snr = huber_threshold(_schedule(), t, _config(huber_schedule="snr", huber_c=0.1, huber_scale=5.0))
    sigmas = [math.sqrt((1 - _alpha_bar(s)) / _alpha_bar(s)) for s in TIMESTEPS]  # sigma = 1 / sqrt(SNR)
    assert snr.tolist() == pytest.approx([0.9 / (1 + s) ** 2 + 0.1 for s in sigmas], rel=1e-4)  # huber_scale unused
    assert 0.9 < snr[0] < 1.0 and 0.1 < snr[2] < 0.11


# ----------------------------------------------------------------------------- checks

def test_keys_are_checked_before_any_model_loads(tmp_path):
    cases = {
        "min_timestep": ({"min_timestep": -1}, "must be >= 0"),
        "max_timestep": ({"min_timestep": 600, "max_timestep": 500}, "is below min_timestep = 600"),
        "ip_noise_gamma": ({"ip_noise_gamma": -0.1}, "must be >= 0"),
        "v_pred_like_loss": ({"v_pred_like_loss": -1.0}, "must be >= 0"),
        "noise_offset_random_strength": ({"noise_offset_random_strength": True}, "needs noise_offset > 0"),
        "adaptive_noise_scale": ({"adaptive_noise_scale": 0.1}, "needs noise_offset > 0"),
        "ip_noise_gamma_random_strength": ({"ip_noise_gamma_random_strength": True}, "needs ip_noise_gamma > 0"),
        "loss_type": ({"loss_type": "l3"}, "must be one of"),
        "huber_schedule": ({"huber_schedule": "linear"}, "must be one of"),
        "huber_c": ({"huber_c": 0.0}, "must be > 0"),
        "huber_scale": ({"huber_scale": -1.0}, "must be > 0"),
    }
    for key, (raw, message) in cases.items():
        with pytest.raises(ConfigError, match=f"key '{key}'.*{message}"):
            build_config({"train_data_dir": str(tmp_path), **raw})


def test_keys_that_need_the_model_are_checked_against_its_schedule_and_target():
    schedule = _schedule()
    refused = [
        ({"max_timestep": 1001}, "epsilon", "max_timestep", "past this model's schedule of 1000"),
        ({"min_timestep": 1000, "max_timestep": 1000}, "epsilon", "min_timestep", "0 to 999"),
        ({"scale_v_pred_loss_like_noise_pred": True}, "epsilon", "scale_v_pred_loss_like_noise_pred", "'epsilon'"),
        ({"v_pred_like_loss": 0.1}, "v_prediction", "v_pred_like_loss", "trains 'v_prediction'"),
    ]
    for options, prediction_type, key, message in refused:
        with pytest.raises(ConfigError, match=f"key '{key}'.*{message}"):
            check_against_model(_config(**options), schedule, prediction_type)
    check_against_model(_config(max_timestep=1000, min_timestep=999), schedule, "epsilon")
    zero_snr = _schedule(zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="key 'debiased_estimation_loss'.*SNR is 0 at timestep 999"):
        check_against_model(_config(debiased_estimation_loss=True), zero_snr, "epsilon")
    check_against_model(_config(debiased_estimation_loss=True, max_timestep=999), zero_snr, "epsilon")
    check_against_model(_config(debiased_estimation_loss=True), zero_snr, "v_prediction")  # 1 / (SNR + 1) = 1


# ----------------------------------------------------------------------------- one training step

@register_plugin
class RecordStep(Plugin):
    """Records the first micro-step's inputs and outputs and the logged main loss."""

    name = "test_record_noise_loss"
    records: list = []

    def extra_losses(self, state, batch, main, rows):
        RecordStep.records.append({"latents": batch.latents.detach().clone(), "slots": list(batch.slots),
                                   "noisy": main.noisy_latents.detach().clone(), "t": main.timesteps.clone(),
                                   "prediction": main.prediction.detach().float().clone(), "target": main.target.clone()})
        return {}

    def on_step_end(self, state, logs):
        RecordStep.records[-1]["loss"] = logs["loss/main"]


def _one_step(preset, kind: str = "inversion", **options) -> dict:
    RecordStep.records = []
    stages = [{"name": kind, "kind": kind, "steps": 1, "learning_rate": 1e-2}]
    Trainer(build_config(preset(stages=stages, plugins={"test_record_noise_loss": {}}, overwrite=True, **options))).run()
    (record,) = RecordStep.records
    return record


def _expected_draws(slots: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The base noise of each slot of stage 0, step 0 (seed 42): the first draw of its generator."""
    generators = [sample_generator(42, 0, 0, slot, STEP_TAG) for slot in slots]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def _mse(record: dict) -> torch.Tensor:
    return ((record["prediction"] - record["target"].float()) ** 2).mean(dim=(1, 2, 3))


def _forward(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward process by hand: sqrt(alpha-bar) x + sqrt(1 - alpha-bar) noise."""
    a = torch.tensor([_alpha_bar(int(s)) for s in t], dtype=torch.float32).reshape(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def test_debiased_and_v_pred_like_loss_reweight_the_old_objective_in_the_inversion_stage(preset):
    off = _one_step(preset)
    noise, generators = _expected_draws(off["slots"], tuple(off["latents"].shape[1:]))
    # off: the old objective; the noise then the timestep uniform in [0, 1000) from each sample's generator
    assert torch.equal(off["target"], noise)
    assert off["t"].tolist() == [int(torch.randint(0, 1000, (), generator=g)) for g in generators]
    assert torch.allclose(off["noisy"], _forward(off["latents"], noise, off["t"]), atol=1e-5)
    assert off["loss"] == pytest.approx(float(_mse(off).mean()), rel=1e-5)

    on = _one_step(preset, debiased_estimation_loss=True, v_pred_like_loss=0.2)
    assert torch.equal(on["t"], off["t"]) and torch.equal(on["target"], off["target"])  # the same draws
    assert torch.allclose(on["prediction"], off["prediction"])
    snr = [min(_snr(int(t)), 1000.0) for t in on["t"]]
    weights = torch.tensor([(1 + 0.2 * (s + 1) / s) / math.sqrt(s) for s in snr])
    assert on["loss"] == pytest.approx(float((_mse(on) * weights).mean()), rel=1e-4)
    assert on["loss"] != pytest.approx(off["loss"], rel=1e-3)


def test_timestep_range_input_perturbation_and_huber_loss_in_a_lora_step(preset):
    record = _one_step(preset, "lora", min_timestep=500, max_timestep=600, ip_noise_gamma=0.5, loss_type="huber",
                       huber_schedule="constant", huber_c=0.3)
    noise, generators = _expected_draws(record["slots"], tuple(record["latents"].shape[1:]))
    timesteps = [int(torch.randint(500, 600, (), generator=g)) for g in generators]
    perturbation = torch.stack([torch.randn(noise.shape[1:], generator=g) for g in generators])
    assert record["t"].tolist() == timesteps
    assert torch.equal(record["target"], noise)  # the target keeps the unperturbed noise
    assert torch.allclose(record["noisy"], _forward(record["latents"], noise + 0.5 * perturbation, record["t"]), atol=1e-5)
    d = record["prediction"] - record["target"]
    huber = (0.6 * (torch.sqrt(d**2 + 0.09) - 0.3)).mean(dim=(1, 2, 3))  # 2c (sqrt(d^2 + c^2) - c), c = 0.3
    assert record["loss"] == pytest.approx(float(huber.mean()), rel=1e-5)
    assert record["loss"] != pytest.approx(float(_mse(record).mean()), rel=1e-2)


def test_v_prediction_scalings_in_a_step_and_their_refusal_on_an_epsilon_model(preset):
    record = _one_step(preset, "lora", v_parameterization=True, scale_v_pred_loss_like_noise_pred=True,
                       debiased_estimation_loss=True)
    snr = [min(_snr(int(t)), 1000.0) for t in record["t"]]
    weights = torch.tensor([s / (s + 1) / (s + 1) for s in snr])
    assert record["loss"] == pytest.approx(float((_mse(record) * weights).mean()), rel=1e-4)
    with pytest.raises(ConfigError, match="key 'scale_v_pred_loss_like_noise_pred'.*'epsilon'"):
        _one_step(preset, "lora", scale_v_pred_loss_like_noise_pred=True)
