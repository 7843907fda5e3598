"""What ran equals what was resolved: the stage-start log, the resolved TOML, the JSONL log and the
LoRA file's metadata all hold the values worked out by hand from the preset (tiny model)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import toml
from safetensors import safe_open

from pti_plugin.cli import main

# 4 images x 2 repeats = 8 entries; batch 2 on one process -> 4 optimizer steps per epoch.
EXPECTED = {
    "inversion": {"steps": 4, "learning_rate": 5e-2, "optimizer_type": "AdamW", "optimizer_args": [],
                  "lr_scheduler": "linear", "lr_warmup_steps": 1, "train_pivot": True, "train_unet": False,
                  "train_text_encoder": False, "pivot_lr": 5e-2},
    "lora": {"steps": 2, "learning_rate": 1e-2, "optimizer_type": "AdamW", "optimizer_args": ["weight_decay=0.1"],
             "lr_scheduler": "linear", "lr_warmup_steps": 1, "train_pivot": False, "train_unet": True,
             "train_text_encoder": False, "unet_lr": 3e-3},
}


def _stage_log_lines(out: str) -> dict[str, dict]:
    """{stage name: {key: value}} parsed from the trainer's ``stage N 'name' (kind): key=value ... | params`` lines."""
    parsed = {}
    for line in out.splitlines():
        match = re.match(r"stage \d+ '(\w+)' \((\w+)\): (.*) \| params", line)
        if match:
            pairs = re.findall(r"(\w+)=(\[[^\]]*\]|'[^']*'|\S+)", match.group(3))
            parsed[match.group(1)] = {k: ast.literal_eval(v) for k, v in pairs}
    return parsed


def test_log_toml_and_metadata_hold_the_resolved_values(preset, tmp_path, capsys):
    raw = preset(max_train_steps=None, lr_scheduler="linear", lr_warmup_steps=1, unet_lr=3e-3, save_precision="float",
                 stages=[{"name": "inversion", "kind": "inversion", "max_train_epochs": 1, "learning_rate": 5e-2},
                         {"name": "lora", "kind": "lora", "steps": 2, "learning_rate": 1e-2,
                          "optimizer_args": ["weight_decay=0.1"]}])
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "p.toml"
    path.write_text(toml.dumps(raw))
    assert main(["--preset", str(path)]) == 0
    out = Path(raw["output_dir"])

    logged = _stage_log_lines(capsys.readouterr().out)
    assert logged == EXPECTED | {"inversion": EXPECTED["inversion"] | {"pivot_weight_decay": 0.0}}  # not a stage key
    saved = {s.pop("name"): s for s in toml.loads((out / "pti.config.toml").read_text())["stages"]}
    assert {name: {k: v for k, v in s.items() if k != "kind"} for name, s in saved.items()} == EXPECTED

    steps = [json.loads(line) for line in (out / "pti.log.jsonl").read_text().splitlines()]
    assert max(e["stage_step"] for e in steps if e["stage"] == "inversion") == 4  # one epoch ran as 4 steps
    assert max(e["stage_step"] for e in steps if e["stage"] == "lora") == 2
    assert max(e["lr/unet_lora"] for e in steps if e["stage"] == "lora") <= 3e-3  # unet_lr reached the lora group

    with safe_open(str(out / "pti.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert {k: meta.get(k) for k in ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_train_steps",
                                     "ss_lr_scheduler", "ss_lr_warmup_steps", "ss_optimizer", "ss_steps")} == {
        "ss_learning_rate": "0.01", "ss_unet_lr": "0.003", "ss_text_encoder_lr": "None", "ss_max_train_steps": "2",
        "ss_lr_scheduler": "linear", "ss_lr_warmup_steps": "1", "ss_optimizer": "AdamW(weight_decay=0.1)", "ss_steps": "6"}
    assert {k: meta.get(k) for k in ("pti_inversion_learning_rate", "pti_inversion_max_train_steps",
                                     "pti_inversion_lr_scheduler", "pti_inversion_pivot_lr",
                                     "pti_inversion_pivot_weight_decay")} == {
        "pti_inversion_learning_rate": "0.05", "pti_inversion_max_train_steps": "4",
        "pti_inversion_lr_scheduler": "linear", "pti_inversion_pivot_lr": "0.05", "pti_inversion_pivot_weight_decay": "0.0"}
