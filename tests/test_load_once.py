"""A file or config read once where one read serves: a sweep being planned shows a warning of its preset once
(not once per run it plans), and a learning curve reads its run's config once."""

from __future__ import annotations

import logging

import pytest
import toml

from pti_plugin.sweeps import lr_sweep


def test_a_sweep_plan_shows_a_preset_warning_once(tiny_model, tiny_dataset, tmp_path, caplog):
    """A lora sweep of 2 rates x 2 training seeds (2 shared pivots, 4 runs), planned only (nothing trains): the
    preset's huber_c beside loss_type l2 is warned about once."""
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(tmp_path / "unused"), "train_batch_size": 2, "max_train_steps": 1, "network_dim": 4,
           "network_alpha": 4.0, "huber_c": 0.2,
           "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2},
                      {"name": "lora", "kind": "lora", "learning_rate": 2e-2}]}
    preset = tmp_path / "p.toml"
    preset.write_text(toml.dumps(raw))
    argv = ["--preset", str(preset), "--stage", "lora", "--lrs", "1e-3,1e-2", "--steps", "2", "--training_seeds", "2",
            "--out", str(tmp_path / "s"), "--no_train", "--no_evaluate", "--gpus", "none"]
    with caplog.at_level(logging.WARNING):
        assert lr_sweep.main(argv) == []
    huber = [r for r in caplog.records if "huber_c = 0.2: not used with loss_type = 'l2'" in r.getMessage()]
    assert len(huber) == 1
    planned = sorted(p.name for p in (tmp_path / "s" / "presets").iterdir())
    assert planned == ["lora-lr0.001-s1.toml", "lora-lr0.001.toml", "lora-lr0.01-s1.toml", "lora-lr0.01.toml",
                       "pivot-s1.toml", "pivot.toml"]
    # the filter is gone after the plan: the same warning shows again when a config is built next
    from pti_plugin.config_loading import build_config

    caplog.clear()
    build_config(raw, check_paths=False)
    build_config(raw, check_paths=False)
    assert sum("huber_c = 0.2" in r.getMessage() for r in caplog.records) == 2


def test_a_learning_curve_reads_its_runs_config_once(tmp_path, monkeypatch):
    """A run of 1 inversion step then 2 LoRA steps with a save at step 2 and its final file (step 3): scoring its
    curve reads ``pti.config.toml`` once, to find the LoRA stage's start, and not again to open each checkpoint."""
    import torch
    from safetensors.torch import save_file

    import pti_plugin.metrics.run_model as run_model
    import pti_plugin.protocol.curve_scores as curve_scores
    from pti_plugin.config_loading import build_config
    from pti_plugin.resolution import resolved_dict

    raw = {"pretrained_model_name_or_path": str(tmp_path / "model"), "train_data_dir": str(tmp_path / "images"),
           "output_dir": str(tmp_path), "stages": [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2},
                                                   {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]}
    (tmp_path / "pti.config.toml").write_text(toml.dumps(resolved_dict(build_config(raw, check_paths=False))))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "pti-step00000002.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "pti.safetensors"), metadata={"ss_steps": "3"})
    reads, read = [], run_model.read_run_config

    def counted(path):
        reads.append(path)
        return read(path)

    class Opened(Exception):
        pass

    def open_model(config, *args, **kwargs):
        assert config.stages[1].kind == "lora"  # the run's config, handed on
        raise Opened

    monkeypatch.setattr(run_model, "read_run_config", counted)
    monkeypatch.setattr(curve_scores, "read_run_config", counted)
    monkeypatch.setattr(run_model, "open_model", open_model)
    assert curve_scores.lora_checkpoints(tmp_path)[0] == 1 and len(reads) == 1
    reads.clear()
    with pytest.raises(Opened):
        curve_scores.score_checkpoints(tmp_path, [0], steps=1, device="cpu")
    assert reads == [tmp_path / "pti.config.toml"]  # read once when the first checkpoint's model opens


@pytest.mark.parametrize("name, widths, vectors", [
    ("a1111.pt", {"*": 768}, "vectors: 2 x 768"),
    ("standalone.safetensors", {"emb_params": 768}, "vectors: 2 x 768"),
    ("sdxl.safetensors", {"clip_l": 768, "clip_g": 1280}, "vectors: clip_l 2 x 768"),
])
def test_inspect_reads_an_embedding_file_once(name, widths, vectors, tmp_path, monkeypatch):
    """``python -m pti_plugin.inspect`` on an embedding (A1111 .pt, standalone safetensors, SDXL's two encoders):
    the file is opened once, its report as before."""
    import torch
    from safetensors.torch import save_file

    import pti_plugin.formats.embedding as embedding
    import pti_plugin.inspect as inspect
    import pti_plugin.safe_load as safe_load

    tensors = {key: torch.ones(2, width) for key, width in widths.items()}
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"string_to_param": tensors, "name": "tok1"}, path)
    else:
        save_file(tensors, str(path))
    opened = []
    for module, attr in ((safe_load, "check_safetensors"), (embedding, "check_safetensors"),
                         (inspect, "safe_torch_load"), (embedding, "safe_torch_load")):
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda p, *a, _real=real, **k: opened.append(p) or _real(p, *a, **k))
    lines, status = inspect.describe(path)
    assert status == 0 and any(line.startswith(vectors) for line in lines), lines
    assert opened == [path]
