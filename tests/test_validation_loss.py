"""kohya's validation loss (validation_split, validation_seed, validate_every_n_steps, validate_every_n_epochs,
max_validation_steps): which images are held out, that they are never trained on (a run that validates trains
bit for bit as a run on its training images alone), that the value is the training objective on fixed draws, when
it runs (and after a resume), and the refusals."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config

from .conftest import draw_character


def _kohya_held_out(names: list[str], split: float, seed: int) -> list[str]:
    """kohya's ``split_train_val`` for the validation side, as written there: the global ``random`` seeded, the
    (sorted) file list shuffled, the last ``round(n * split)`` taken."""
    state = random.getstate()
    random.seed(seed)
    shuffled = list(names)
    random.shuffle(shuffled)
    random.setstate(state)
    return sorted(shuffled[len(shuffled) - round(len(shuffled) * split):])


def _scan(raw: dict):
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.scanning import scan_images_and_held_out

    config = build_config(raw)
    return scan_images_and_held_out(config, load_subsets(config))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pti.log.jsonl").read_text().splitlines()]


def test_held_out_images_are_kohyas_seeded_split_and_never_in_training(preset):
    names = ["0.png", "1.png", "2.png", "3.png"]
    for extra, seed in [({}, 42), ({"seed": 7}, 7), ({"seed": 7, "validation_seed": 3}, 3)]:
        for split in (0.25, 0.5):
            train, held = _scan(preset(validation_split=split, **extra))
            assert sorted(i.path.name for i in held) == _kohya_held_out(names, split, seed)
            assert sorted(i.path.name for i in train + held) == names  # a partition: nothing lost, nothing twice
            assert {i.path.name for i in train}.isdisjoint(i.path.name for i in held)
    train, held = _scan(preset(validation_split=0.25))  # seed 42: pinned, whatever the helper above says
    assert [i.path.name for i in held] == ["0.png"] and [i.path.name for i in train] == ["1.png", "2.png", "3.png"]
    assert _scan(preset())[1] == []  # off by default


def test_dataset_config_splits_per_dataset_and_never_holds_out_reg_images(preset, tmp_path):
    for folder, count in (("a", 6), ("b", 3), ("reg", 4)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            draw_character(tmp_path / folder / f"{folder}{i}.png", i)
    (tmp_path / "d.toml").write_text(
        "[general]\nvalidation_split = 0.5\n"
        "[[datasets]]\nvalidation_seed = 5\n[[datasets.subsets]]\nimage_dir = 'a'\nclass_tokens = 'tok1'\n"
        "[[datasets.subsets]]\nimage_dir = 'reg'\nis_reg = true\nclass_tokens = 'person'\n"
        "[[datasets]]\nvalidation_split = 0.34\n[[datasets.subsets]]\nimage_dir = 'b'\nclass_tokens = 'tok1'\n")
    raw = preset(train_data_dir="", dataset_config=str(tmp_path / "d.toml"), seed=11)
    train, held = _scan(raw)
    expected = _kohya_held_out([f"a{i}.png" for i in range(6)], 0.5, 5) + _kohya_held_out(["b0.png", "b1.png", "b2.png"], 0.34, 11)
    assert sorted(i.path.name for i in held) == sorted(expected) and len(expected) == 4
    assert not any(i.is_reg for i in held) and sum(i.is_reg for i in train) == 4  # every reg image stays
    with pytest.raises(ConfigError, match="'validation_split' is a dataset option"):
        (tmp_path / "s.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nvalidation_split = 0.5\n")
        _scan(raw | {"dataset_config": str(tmp_path / "s.toml")})


@pytest.mark.parametrize("key, value, message", [
    ("validation_split", 1.0, "key 'validation_split' expects a number in [0, 1), got 1.0"),
    ("validation_split", -0.1, "key 'validation_split' expects a number in [0, 1), got -0.1"),
    ("validation_seed", -1, "key 'validation_seed' expects an integer between 0 and"),
    ("validate_every_n_steps", 0, "key 'validate_every_n_steps' must be > 0, got 0"),
    ("validate_every_n_epochs", -2, "key 'validate_every_n_epochs' must be > 0, got -2"),
    ("max_validation_steps", 0, "key 'max_validation_steps' must be > 0, got 0"),
])
def test_bad_validation_values_are_refused_naming_the_key(preset, key, value, message):
    with pytest.raises(ConfigError) as error:
        build_config(preset(validation_split=0.25) | {key: value})
    assert message in str(error.value)


@pytest.mark.parametrize("split, side", [(0.1, "no validation image"), (0.9, "no training image")])
def test_a_split_leaving_a_side_empty_is_refused_naming_key_and_subset(preset, tiny_dataset, split, side):
    with pytest.raises(ConfigError) as error:
        _scan(preset(validation_split=split))
    assert f"validation_split = {split} leaves {side} in subset {tiny_dataset / '2_tok1'}" in str(error.value)


def test_validation_keys_without_a_split_warn_naming_them(preset, caplog):
    with caplog.at_level(logging.WARNING):
        train, held = _scan(preset(validate_every_n_steps=5, max_validation_steps=2))
    assert held == [] and len(train) == 4
    assert "validate_every_n_steps, max_validation_steps set, but no subset has validation_split > 0" in caplog.text


def test_validating_trains_exactly_as_a_run_on_the_training_images_alone(preset, tiny_dataset, tmp_path):
    """validation_split = 0.25 holds out 0.png (seed 42); validating at every step of both stages, with the latent
    and text-encoder caches, must train bit for bit as a run whose folder holds only 1.png, 2.png and 3.png."""
    from pti_plugin.trainer import Trainer

    alone = tmp_path / "alone" / "2_tok1"
    alone.mkdir(parents=True)
    for name in ("1.png", "2.png", "2.txt", "3.png"):
        shutil.copy(tiny_dataset / "2_tok1" / name, alone / name)
    common = dict(stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
                          {"kind": "lora", "steps": 2, "learning_rate": 1e-2}],
                  cache_latents=True, cache_text_encoder_outputs=True)
    validating = Trainer(build_config(preset(output_dir=str(tmp_path / "a"), validation_split=0.25,
                                             validate_every_n_steps=1, **common)))
    validating.run()
    Trainer(build_config(preset(output_dir=str(tmp_path / "b"), train_data_dir=str(tmp_path / "alone"), **common))).run()
    assert [i.path.name for i in validating.items] == ["1.png", "2.png", "3.png"]
    assert [e["global_step"] for e in _log(tmp_path / "a") if "loss/validation/step_average" in e] == [1, 2, 3, 4]
    for name in ("pti.safetensors", "tok1.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


STAGES = [{"kind": "inversion", "steps": 4, "learning_rate": 5e-2}, {"kind": "lora", "steps": 4, "learning_rate": 2e-2}]


@pytest.fixture(scope="module")
def validated_run(tiny_model, tiny_dataset, tmp_path_factory):
    """Two stages of 4 steps, 3 training images x 2 repeats at batch 2: 3 steps per epoch; validation every 2 global
    steps and every 2nd epoch; a state saved at step 3."""
    from pti_plugin.trainer import Trainer

    out = tmp_path_factory.mktemp("validated")
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(out), "train_batch_size": 2, "log_every_n_steps": 100, "network_dim": 4,
           "network_alpha": 4.0, "stages": STAGES, "validation_split": 0.25, "validate_every_n_steps": 2,
           "validate_every_n_epochs": 2, "save_every_n_steps": 3, "save_state": True}
    trainer = Trainer(build_config(raw))
    trainer.run()
    return raw, trainer, _log(out)


def _validations(log: list[dict]) -> dict[int, dict]:
    return {e["global_step"]: {k: v for k, v in e.items() if k.startswith("loss/validation/")} for e in log
            if any(k.startswith("loss/validation/") for k in e)}


def test_validations_run_at_kohyas_steps_and_again_after_a_resume(validated_run, tmp_path):
    from pti_plugin.trainer import Trainer

    raw, _, log = validated_run
    found = _validations(log)
    # every 2 global steps; epochs end at stage steps 3 and 4 (the partial 2nd epoch): the 2nd at global 4 and 8
    assert {s: sorted(v) for s, v in found.items()} == {
        2: ["loss/validation/step_average", "loss/validation/step_divergence"],
        4: ["loss/validation/epoch_average", "loss/validation/epoch_divergence", "loss/validation/step_average",
            "loss/validation/step_divergence"],
        6: ["loss/validation/step_average", "loss/validation/step_divergence"],
        8: ["loss/validation/epoch_average", "loss/validation/epoch_divergence", "loss/validation/step_average",
            "loss/validation/step_divergence"]}
    assert [e["global_step"] for e in log] == [2, 4, 6, 8]  # log_every_n_steps = 100: a validating step is logged
    assert found[4]["loss/validation/step_average"] == found[4]["loss/validation/epoch_average"]
    state = Path(raw["output_dir"]) / "pti-state-step00000003"
    Trainer(build_config(raw | {"output_dir": str(tmp_path), "resume": str(state), "save_every_n_steps": 0})).run()
    resumed = _validations(_log(tmp_path))
    assert sorted(resumed) == [4, 6, 8] and all(resumed[s].keys() == found[s].keys() for s in resumed)
    for step, values in resumed.items():  # the same held-out images, draws and (bit-identical) weights
        for key in values:
            if key.endswith("_average"):
                assert values[key] == found[step][key], (step, key)


def test_validation_loss_is_the_objective_on_fixed_draws(validated_run):
    """The last validation (step 8, final weights) by hand: the held-out 0.png's latent, noise from the documented
    generator (seed, stream, image 0, timestep k), kohya's timesteps 200/400/600/800, the epsilon MSE, averaged;
    the same value again when the weights do not change, and a different one at every step the weights did."""
    from pti_plugin.data.latents import LatentSource
    from pti_plugin.data.sample_order import sample_generator
    from pti_plugin.validation import NOISE_STREAM

    raw, trainer, log = validated_run
    found = _validations(log)
    final = found[8]["loss/validation/step_average"]
    assert trainer.validation.loss() == final and trainer.validation.loss() == final
    averages = [found[s]["loss/validation/step_average"] for s in (2, 4, 6, 8)]
    assert len(set(averages)) == 4
    base = trainer.model.base
    item = trainer.validation.items[0]
    assert item.path.name == "0.png" and base.noise_scheduler.config.num_train_timesteps == 1000
    latent = LatentSource(base.vae, [item], raw.get("seed", 42), False, False).latent(0, False)[None]
    with torch.no_grad():
        cond = trainer.model.encode(trainer.model.tokenize(["an anime illustration of tok1"]))
        losses = []
        for k, t in enumerate((200, 400, 600, 800)):
            noise = torch.randn(latent.shape[1:], generator=sample_generator(42, NOISE_STREAM, 0, k))[None]
            timesteps = torch.tensor([t])
            prediction = base.unet(base.noise_scheduler.add_noise(latent, noise, timesteps), timesteps,
                                   **cond.unet_kwargs()).sample
            losses.append(F.mse_loss(prediction.float(), noise).item())
    assert sum(losses) / 4 == pytest.approx(final, rel=1e-6)


def test_epoch_validation_defaults_to_every_epoch_as_kohya():
    from pti_plugin.save_schedule import nth_epoch_ends
    from pti_plugin.validation import validation_batches

    # 3 steps per epoch, a stage of 7: epochs end at 3, 6 and (partial) 7
    assert [s for s in range(1, 8) if nth_epoch_ends(None, s, 7, 3)] == [3, 6, 7]
    assert [s for s in range(1, 8) if nth_epoch_ends(2, s, 7, 3)] == [6]
    assert [s for s in range(1, 8) if nth_epoch_ends(3, s, 7, 3)] == [7]

    class Item:
        def __init__(self, bucket):
            self.bucket = bucket

    items = [Item((32, 32)), Item((64, 32)), Item((32, 32)), Item((32, 32))]
    assert validation_batches(items, 2, None) == [[0, 2], [3], [1]]
    assert validation_batches(items, 2, 2) == [[0, 2], [3]]  # max_validation_steps: the first batches


def test_the_divergence_subtracts_kohyas_moving_average_to_the_last_bit():
    """kohya's ``*_divergence`` is the validation loss minus ``loss_recorder.moving_average`` (train_network.py),
    whose running total drops the loss an epoch before and adds the new one: here with a window of 3 steps and
    the main losses below, written out from that rule (at step 6 it differs in the last bit from a fresh mean)."""
    from types import SimpleNamespace

    from pti_plugin.validation import Validation

    validation = object.__new__(Validation)
    validation.enabled, validation.loss = True, lambda: 0.5  # 0.5 - x: exact for these x
    validation.config = SimpleNamespace(validate_every_n_steps=1, validate_every_n_epochs=None)
    validation.text_cache = SimpleNamespace(caches=lambda encoders: False)
    validation.start_stage(SimpleNamespace(steps=8, trains=SimpleNamespace(text_encoders=())), 3)
    losses = [0.1, 0.7, 0.3, 0.9, 0.2, 0.05, 1.3, 0.4]
    got = [validation.after_step(SimpleNamespace(global_step=s, stage_step=s), {"loss/main": loss})
           ["loss/validation/step_divergence"] for s, loss in enumerate(losses, 1)]
    total = [0.1, 0.1 + 0.7, 0.1 + 0.7 + 0.3]
    total.append(total[-1] - 0.1 + 0.9)
    total.append(total[-1] - 0.7 + 0.2)
    total.append(total[-1] - 0.3 + 0.05)
    total.append(total[-1] - 0.9 + 1.3)
    total.append(total[-1] - 0.2 + 0.4)
    assert got == [0.5 - t / n for t, n in zip(total, [1, 2, 3, 3, 3, 3, 3, 3])]
    assert got[5] != 0.5 - (0.9 + 0.2 + 0.05) / 3  # kohya's total, not a fresh sum of the window
