"""kohya's metadata_title/author/description/license/tags, training_comment and save_n_epoch_ratio.

The expectations are kohya sd-scripts' own, written out here: ``library/sai_model_spec.py`` and
``train_util.get_sai_model_spec`` (``modelspec.*`` keys, the title defaulting to ``output_name``, tags stored as
the one string given), ``train_network.py`` (``ss_training_comment``; ``save_every_n_epochs = floor(epochs /
save_n_epoch_ratio) or 1``, epochs = ceil(steps / steps per epoch)) and ``train_textual_inversion.py`` (the same
``modelspec.*`` in the embedding, architecture ``.../textual-inversion``).
"""

from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer

GIVEN = {
    "metadata_title": "Red-blue square v1",
    "metadata_author": "Jane Doe",
    "metadata_description": "A character LoRA.\nSecond line: ünïcödé",
    "metadata_license": "CreativeML Open RAIL-M",
    "metadata_tags": "anime, character, tok1",
    "training_comment": "4 images x 2 repeats; see notes",
}
#: kohya's key for each option above.
KOHYA_KEYS = {
    "metadata_title": "modelspec.title",
    "metadata_author": "modelspec.author",
    "metadata_description": "modelspec.description",
    "metadata_license": "modelspec.license",
    "metadata_tags": "modelspec.tags",
    "training_comment": "ss_training_comment",
}
STABILITY = "https://github.com/Stability-AI/generative-models"


def _raw(tiny_model: Path, tiny_dataset: Path, out: Path, **overrides) -> dict:
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(out), "network_dim": 4, "network_alpha": 4.0, "log_every_n_steps": 100}
    return raw | overrides


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@pytest.fixture(scope="module")
def options_run(tiny_model, tiny_dataset, tmp_path_factory) -> Path:
    """Every option set; 4 images x 2 repeats at batch 4 = 2 steps an epoch; 4 epochs of inversion, then 2 of lora.
    save_every_n_epochs = 1 alone would save at every epoch end (steps 2, 4, 6, 8, 10)."""
    out = tmp_path_factory.mktemp("options") / "out"
    raw = _raw(tiny_model, tiny_dataset, out, train_batch_size=4, save_n_epoch_ratio=2, save_every_n_epochs=1,
               stages=[{"kind": "inversion", "max_train_epochs": 4, "learning_rate": 5e-2},
                       {"kind": "lora", "max_train_epochs": 2, "learning_rate": 1e-2}], **GIVEN)
    Trainer(build_config(raw)).run()
    return out


def test_save_n_epoch_ratio_saves_as_kohya_in_each_stage(options_run):
    # stage 0: 4 epochs, every floor(4 / 2) = 2 epochs: epochs 2 and 4 = global steps 4 and 8 (its end: not the run's);
    # stage 1: 2 epochs, every floor(2 / 2) = 1 epoch: epoch 1 = step 10; epoch 2 = step 12 is the final save.
    steps = (4, 8, 10)
    assert sorted(p.name for p in options_run.glob("pti-step*.safetensors")) == [f"pti-step{n:08d}.safetensors" for n in steps]
    assert sorted(p.name for p in options_run.glob("tok1-step*.safetensors")) == [f"tok1-step{n:08d}.safetensors" for n in steps]
    assert _metadata(options_run / "pti.safetensors")["ss_steps"] == "12"


def test_the_given_metadata_is_in_every_lora_and_embedding(options_run):
    before = datetime.datetime.now() - datetime.timedelta(minutes=10)
    for name in ("pti.safetensors", "pti-step00000004.safetensors"):
        meta = _metadata(options_run / name)
        assert {KOHYA_KEYS[k]: meta.get(KOHYA_KEYS[k]) for k in GIVEN} == {KOHYA_KEYS[k]: v for k, v in GIVEN.items()}
        assert meta["modelspec.sai_model_spec"] == "1.0.1"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.implementation"] == "diffusers"
        assert meta["modelspec.resolution"] == "32x32"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
        assert datetime.datetime.fromisoformat(meta["modelspec.date"]) >= before.replace(microsecond=0)
        # the keys written before stay as they were
        assert (meta["ss_output_name"], meta["ss_network_dim"], meta["ss_base_model_version"]) == ("pti", "4", "sd_v1")
    for name in ("tok1.safetensors", "tok1-step00000004.safetensors"):
        meta = _metadata(options_run / name)
        expected = {KOHYA_KEYS[k]: v for k, v in GIVEN.items() if k != "training_comment"}
        assert {k: meta.get(k) for k in expected} == expected
        assert "ss_training_comment" not in meta  # kohya's textual inversion writes modelspec only
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
        assert meta["modelspec.implementation"] == STABILITY
        assert meta["modelspec.resolution"] == "32x32"


def test_defaults_title_is_output_name_and_the_rest_is_left_out(tiny_model, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    Trainer(build_config(_raw(tiny_model, tiny_dataset, out, output_name="char", train_batch_size=8,
                              stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]))).run()
    for name, architecture in (("char.safetensors", "stable-diffusion-v1/lora"),
                               ("tok1.safetensors", "stable-diffusion-v1/textual-inversion")):
        meta = _metadata(out / name)
        assert meta["modelspec.title"] == "char"
        assert meta["modelspec.architecture"] == architecture
        assert not {"modelspec.author", "modelspec.description", "modelspec.license", "modelspec.tags",
                    "ss_training_comment"} & set(meta)


def test_save_n_epoch_ratio_counts_a_partial_last_epoch_as_kohya():
    """kohya: epochs = ceil(steps / steps per epoch); 7 steps of 2 = 4 epochs, ratio 2 -> every 2 epochs (floor
    would give 3 epochs -> every epoch); more saves asked than epochs -> every epoch; ratio unset -> save_every_n_epochs."""
    from types import SimpleNamespace

    from pti_plugin.outputs import epoch_save_due, epoch_save_interval

    config = SimpleNamespace(save_n_epoch_ratio=2, save_every_n_epochs=3)
    assert epoch_save_interval(config, 7, 2) == 2
    assert [step for step in range(1, 8) if epoch_save_due(config, step, 7, 2)] == [4]
    assert epoch_save_interval(SimpleNamespace(save_n_epoch_ratio=10, save_every_n_epochs=0), 6, 2) == 1
    assert epoch_save_interval(SimpleNamespace(save_n_epoch_ratio=None, save_every_n_epochs=3), 7, 2) == 3


def test_sdxl_files_name_kohyas_sdxl_architecture_and_implementation():
    from pti_plugin.formats.model_spec import model_spec_metadata

    lora = model_spec_metadata("lora", "sdxl", "t", [1024, 768], 0.0, {"tags": "a, b", "author": None})
    embedding = model_spec_metadata("embedding", "sdxl", "t", 1024, 0.0)
    assert (lora["modelspec.architecture"], lora["modelspec.implementation"]) == ("stable-diffusion-xl-v1-base/lora", STABILITY)
    assert embedding["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert (lora["modelspec.resolution"], embedding["modelspec.resolution"]) == ("1024x768", "1024x1024")
    assert lora["modelspec.tags"] == "a, b" and "modelspec.author" not in lora


@pytest.mark.parametrize("key, value, message", [
    ("metadata_title", ["a", "b"], "key 'metadata_title' expects str | None, got ['a', 'b']"),
    ("metadata_tags", ["anime", "character"], "key 'metadata_tags' expects str | None, got ['anime', 'character']"),
    ("metadata_author", 3, "key 'metadata_author' expects str | None, got 3"),
    ("metadata_description", {"a": 1}, "key 'metadata_description' expects str | None"),
    ("metadata_license", True, "key 'metadata_license' expects str | None, got True"),
    ("training_comment", 1.5, "key 'training_comment' expects str | None, got 1.5"),
    ("save_n_epoch_ratio", 0, "key 'save_n_epoch_ratio' must be > 0, got 0"),
    ("save_n_epoch_ratio", -2, "key 'save_n_epoch_ratio' must be > 0, got -2"),
    ("save_n_epoch_ratio", 2.5, "key 'save_n_epoch_ratio' expects int | None, got 2.5"),
    ("save_n_epoch_ratio", True, "key 'save_n_epoch_ratio' expects int | None, got True"),
])
def test_bad_values_are_refused_naming_the_key(tiny_model, tiny_dataset, tmp_path, key, value, message):
    with pytest.raises(ConfigError) as caught:
        build_config(_raw(tiny_model, tiny_dataset, tmp_path / "out", **{key: value}))
    assert message in str(caught.value) and caught.value.key == key


def test_save_n_epoch_ratio_beside_save_every_n_epochs_warns_that_it_replaces_it(tiny_model, tiny_dataset, tmp_path,
                                                                                  caplog):
    with caplog.at_level(logging.WARNING):
        config = build_config(_raw(tiny_model, tiny_dataset, tmp_path / "out", save_n_epoch_ratio=3, save_every_n_epochs=1))
    assert (config.save_n_epoch_ratio, config.save_every_n_epochs) == (3, 1)
    assert "save_n_epoch_ratio = 3 replaces save_every_n_epochs = 1" in caplog.text


def test_the_pivot_digest_names_the_tensors_not_the_metadata_a_run_wrote_beside_them(tmp_path):
    """LoRA runs sharing a pivot each write it again with their own ``modelspec`` title and date: the sweeps'
    ``pivot_digest`` must still be one; a file without metadata keeps its digest of before (its bytes' SHA-256)."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from pti_plugin.metrics.run_model import tensors_digest

    tensors = {"emb_params": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    plain, run_a, run_b = (tmp_path / f"{n}.safetensors" for n in ("plain", "a", "b"))
    save_file(tensors, str(plain))
    save_file(tensors, str(run_a), metadata={"modelspec.title": "lora-lr1e-3", "modelspec.date": "2026-12-07T09:00:00"})
    save_file(tensors, str(run_b), metadata={"modelspec.title": "lora-lr1e-1", "modelspec.date": "2026-12-07T09:05:00"})
    assert run_a.read_bytes() != run_b.read_bytes()
    assert tensors_digest(run_a) == tensors_digest(run_b) == tensors_digest(plain)
    assert tensors_digest(plain) == hashlib.sha256(plain.read_bytes()).hexdigest()[:12]
    save_file({"emb_params": tensors["emb_params"] + 1}, str(run_b))
    assert tensors_digest(run_b) != tensors_digest(plain)
