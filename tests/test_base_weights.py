"""kohya's base_weights / base_weights_multiplier: LoRA files merged into the base model before training.

Expectations are computed here from the hand-written matrices (kohya's merge rule written out), never through the
package's key table or merge code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.models.loading import load_base_model as _load

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # Conv2d 1x1, 32 -> 32
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 3x3, 32 -> 32 (LoCon)
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # CLIP layer 0 q_proj, 32 -> 32
UNET_PATH = {Q: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             PROJ_IN: "down_blocks.0.attentions.0.proj_in", CONV: "down_blocks.0.resnets.0.conv1"}
TE_PATH = "encoder.layers.0.self_attn.q_proj"  # its path in the installed transformers' CLIPTextModel (either form)


def load_base_model(path: str, base_weights=(), base_weights_multiplier=()):
    """The base model as the trainer has it: loaded, then the base_weights merged."""
    from pti_plugin.base_weights import merge_base_weights

    base = _load(path)
    merge_base_weights(base, base_weights, base_weights_multiplier)
    return base


def _small(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * 0.1


def _lora_file(path: Path, seed: int = 0, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A kohya LoRA written by hand: rank 2 on to_q (alpha 1), proj_in as 1x1 tensors (alpha 4), the LoCon 3x3 conv1
    (alpha 0.5) and the text encoder's q_proj without alpha (alpha = rank), plus a bundled embedding."""
    tensors = {
        f"{Q}.lora_down.weight": _small((2, 32), seed), f"{Q}.lora_up.weight": _small((32, 2), seed + 1),
        f"{Q}.alpha": torch.tensor(1.0),
        f"{PROJ_IN}.lora_down.weight": _small((2, 32, 1, 1), seed + 2), f"{PROJ_IN}.lora_up.weight": _small((32, 2, 1, 1), seed + 3),
        f"{PROJ_IN}.alpha": torch.tensor(4.0),
        f"{CONV}.lora_down.weight": _small((2, 32, 3, 3), seed + 4), f"{CONV}.lora_up.weight": _small((32, 2, 1, 1), seed + 5),
        f"{CONV}.alpha": torch.tensor(0.5),
        f"{TE_Q}.lora_down.weight": _small((2, 32), seed + 6), f"{TE_Q}.lora_up.weight": _small((32, 2), seed + 7),
        "bundle_emb.tok1.string_to_param.*": _small((1, 32), seed + 8),
    } | (extra or {})
    save_file(tensors, str(path))
    return tensors


def _expected_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """(alpha / rank) * up @ down in the weight's shape, written out: for a 3x3 convolution each kernel tap is the
    product of up's matrix and that tap of down."""
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    rank = down.shape[0]
    scale = float(tensors[f"{name}.alpha"]) / rank if f"{name}.alpha" in tensors else 1.0
    if down.dim() == 2:
        return scale * up @ down
    up2 = up[:, :, 0, 0]
    out = torch.zeros(up.shape[0], down.shape[1], *down.shape[2:], dtype=torch.float64)
    for kh in range(down.shape[2]):
        for kw in range(down.shape[3]):
            out[:, :, kh, kw] = up2 @ down[:, :, kh, kw]
    return scale * out


def _te_module_path(text_encoder) -> str:
    names = {n for n, _ in text_encoder.named_modules()}
    return TE_PATH if TE_PATH in names else "text_model." + TE_PATH


def _weights(base) -> dict[str, dict[str, torch.Tensor]]:
    return {"unet": base.unet.state_dict(), "te": base.text_encoder.state_dict(), "vae": base.vae.state_dict()}


def _check_merged(plain, merged, files: list[tuple[dict, float]]) -> None:
    """Each adapted weight = original + sum of m * delta (within 1e-6); every other tensor identical bit for bit."""
    te_key = _te_module_path(plain.text_encoder) + ".weight"
    targets = {("unet", f"{p}.weight"): n for n, p in UNET_PATH.items()} | {("te", te_key): TE_Q}
    a, b = _weights(plain), _weights(merged)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            if (part, key) in targets:
                expected = a[part][key].double() + sum(m * _expected_delta(t, targets[part, key]) for t, m in files)
                assert not torch.equal(a[part][key], b[part][key])
                assert torch.allclose(b[part][key].double(), expected, atol=1e-6, rtol=0), (part, key)
            else:
                assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_one_file_merges_by_kohyas_rule_and_touches_nothing_else(tiny_model, tmp_path):
    tensors = _lora_file(tmp_path / "a.safetensors")
    plain = load_base_model(str(tiny_model))
    merged = load_base_model(str(tiny_model), base_weights=[str(tmp_path / "a.safetensors")], base_weights_multiplier=[0.7])
    _check_merged(plain, merged, [(tensors, 0.7)])
    assert "merged with a.safetensors x 0.7" in merged.source
    default = load_base_model(str(tiny_model), base_weights=[str(tmp_path / "a.safetensors")])  # 1.0 when none given
    _check_merged(plain, default, [(tensors, 1.0)])


def test_two_files_with_two_multipliers_add_up(tiny_model, tmp_path):
    first, second = _lora_file(tmp_path / "a.safetensors", 0), _lora_file(tmp_path / "b.safetensors", 100)
    plain = load_base_model(str(tiny_model))
    merged = load_base_model(str(tiny_model), base_weights=[str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
                             base_weights_multiplier=[0.5, -1.5])
    _check_merged(plain, merged, [(first, 0.5), (second, -1.5)])


def _refused_at_start(preset, match: str, **keys) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config(preset(**keys))


def test_bad_files_and_multipliers_are_refused_at_start_naming_key_and_file(preset, tmp_path):
    good = str(tmp_path / "good.safetensors")
    _lora_file(Path(good))
    missing = str(tmp_path / "missing.safetensors")
    _refused_at_start(preset, r"base_weights.: file not found: looked for .*missing\.safetensors \(a kohya LoRA",
                      base_weights=[good, missing])
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "embedding.safetensors"))
    _refused_at_start(preset, r"base_weights.*embedding\.safetensors is not a kohya LoRA: key 'emb_params'",
                      base_weights=[str(tmp_path / "embedding.safetensors")])
    save_file({"bundle_emb.tok1.string_to_param.*": torch.zeros(1, 32)}, str(tmp_path / "only_emb.safetensors"))
    _refused_at_start(preset, r"base_weights.*only_emb\.safetensors holds no LoRA tensors",
                      base_weights=[str(tmp_path / "only_emb.safetensors")])
    save_file({f"{Q}.lora_down.weight": torch.full((2, 32), float("nan")), f"{Q}.lora_up.weight": torch.zeros(32, 2)},
              str(tmp_path / "nan.safetensors"))
    _refused_at_start(preset, rf"base_weights.*nan\.safetensors holds non-finite values.*{Q}\.lora_down\.weight",
                      base_weights=[str(tmp_path / "nan.safetensors")])
    _refused_at_start(preset, r"base_weights_multiplier.* holds 1 value\(s\) for 2 base_weights file",
                      base_weights=[good, good], base_weights_multiplier=[0.5])
    _refused_at_start(preset, r"base_weights_multiplier.* holds 1 value\(s\) for 0 base_weights file",
                      base_weights_multiplier=[0.5])
    _refused_at_start(preset, r"base_weights_multiplier\.1.*finite", base_weights=[good, good],
                      base_weights_multiplier=[1.0, float("inf")])


def test_another_familys_keys_and_bad_shapes_are_refused_as_the_model_loads(tiny_model, tmp_path):
    sdxl_key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{sdxl_key}.lora_down.weight": torch.zeros(2, 32), f"{sdxl_key}.lora_up.weight": torch.zeros(32, 2)},
              str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ConfigError, match=rf"base_weights.*sdxl\.safetensors.*{sdxl_key}\.lora_down\.weight"):
        load_base_model(str(tiny_model), base_weights=[str(tmp_path / "sdxl.safetensors")])
    save_file({f"{Q}.lora_down.weight": torch.zeros(2, 16), f"{Q}.lora_up.weight": torch.zeros(32, 2)},
              str(tmp_path / "shape.safetensors"))
    with pytest.raises(ConfigError, match=rf"base_weights.*shape\.safetensors.*{Q}\.lora_down\.weight.*\[32, 32\]"):
        load_base_model(str(tiny_model), base_weights=[str(tmp_path / "shape.safetensors")])


def test_paths_resolve_like_network_weights_and_the_cli_reads_number_lists(preset, tmp_path):
    from pti_plugin.cli import parse_args
    from pti_plugin.config_loading import load_config

    (tmp_path / "p").mkdir()
    _lora_file(tmp_path / "p" / "style.safetensors")
    raw = preset()
    lines = [f"{k} = {json.dumps(v)}" for k, v in raw.items() if k != "stages"]
    lines += ['base_weights = ["style.safetensors"]', "base_weights_multiplier = [2]"]
    lines += ["[[stages]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in s.items()) for s in raw["stages"]]
    (tmp_path / "p" / "preset.toml").write_text("\n".join(lines) + "\n")
    config = load_config(tmp_path / "p" / "preset.toml")
    assert config.base_weights == [str((tmp_path / "p" / "style.safetensors").resolve())]
    assert config.base_weights_multiplier == [2.0]
    _, overrides, _ = parse_args(["--base_weights", "a.safetensors", "b.safetensors", "--base_weights_multiplier", "1", "0.5"])
    assert overrides == {"base_weights": ["a.safetensors", "b.safetensors"], "base_weights_multiplier": [1, 0.5]}


class _CountingHandle:
    """A safetensors handle that counts the tensors read through it (``reads``: (file, tensor name) -> reads)."""

    def __init__(self, handle, path: str, reads: dict):
        self.handle, self.path, self.reads = handle, path, reads

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def get_tensor(self, name):
        self.reads[(self.path, name)] = self.reads.get((self.path, name), 0) + 1
        return self.handle.get_tensor(name)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_run_on_merged_weights_records_them_and_is_measured_on_the_merged_base(preset, tmp_path, caplog, monkeypatch):
    """A run on a merged base records the files (its start-up line, config and LoRA metadata) and is measured on the
    merged base; from the start-up check to the merge, each tensor of the file is read once."""
    import safetensors

    from pti_plugin.metrics.run_model import open_model, read_run_config
    from pti_plugin.trainer import Trainer

    tensors = _lora_file(tmp_path / "style.safetensors")
    reads: dict = {}
    opener = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: _CountingHandle(opener(path, *a, **k),
                                                                                        Path(path).name, reads))
    config = build_config(preset(base_weights=[str(tmp_path / "style.safetensors")], base_weights_multiplier=[0.5],
                                 stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-2}]))
    with caplog.at_level("INFO"):
        Trainer(config).run()
    monkeypatch.undo()
    assert {name: n for (file, name), n in reads.items() if file == "style.safetensors"} == dict.fromkeys(tensors, 1)
    assert "merged with style.safetensors x 0.5" in caplog.text  # the start-up line: the run trained on the merge
    out = Path(config.output_dir)
    saved = read_run_config(out / "pti.config.toml")
    assert saved.base_weights == [str(tmp_path / "style.safetensors")] and saved.base_weights_multiplier == [0.5]
    with safe_open(str(out / "pti.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["pti_base_weights"]) == [["style.safetensors", 0.5]]
    run = open_model(saved, device="cpu")
    original = load_base_model(config.pretrained_model_name_or_path).unet.state_dict()[f"{UNET_PATH[Q]}.weight"]
    expected = original.double() + 0.5 * _expected_delta(tensors, Q)
    assert torch.allclose(run.pipe.unet.state_dict()[f"{UNET_PATH[Q]}.weight"].double(), expected, atol=1e-6, rtol=0)


def test_a_resume_on_another_base_is_warned_about_naming_both(preset, tmp_path, caplog):
    """A state records what it was trained on (model, vae, base_weights by file name); a resume with other
    base_weights went on silently, training against other weights. Now a warning names both; the same base, and a
    state written before the record (no ``base`` in progress.json), resume without it."""
    from pti_plugin.trainer import Trainer

    _lora_file(tmp_path / "style.safetensors")
    stages = [{"kind": "lora", "steps": 3, "learning_rate": 1e-2}]
    raw = preset(base_weights=[str(tmp_path / "style.safetensors")], base_weights_multiplier=[0.5], stages=stages,
                 save_every_n_steps=2, save_state=True)
    Trainer(build_config(raw)).run()
    state = Path(raw["output_dir"]) / "pti-state-step00000002"
    progress = json.loads((state / "progress.json").read_text())
    assert progress["base"] == {"model": Path(raw["pretrained_model_name_or_path"]).name, "vae": None,
                                "base_weights": [["style.safetensors", 0.5]]}

    def resume(name: str, **overrides) -> str:
        caplog.clear()
        with caplog.at_level("WARNING"):
            Trainer(build_config(raw | {"output_dir": str(tmp_path / name), "resume": str(state),
                                        "save_every_n_steps": 0} | overrides)).run()
        return caplog.text

    other = resume("other", base_weights_multiplier=[1.0])
    assert "was trained on another base than this run's" in other
    assert "base_weights [['style.safetensors', 0.5]] then, [['style.safetensors', 1.0]] now" in other
    assert "another base" not in resume("same")
    del progress["base"]
    (state / "progress.json").write_text(json.dumps(progress))
    assert "another base" not in resume("old_state", base_weights=[], base_weights_multiplier=[])
