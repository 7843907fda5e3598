"""The README's first command: the demo preset trains on the embedded default model and data."""

from __future__ import annotations

from pathlib import Path

from pti_plugin.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_demo_preset_runs_on_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PTI_PLUGIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code = main(["--preset", str(REPO / "presets" / "demo.toml"), "--output_dir", str(out), "--sample_steps", "2",
                 "--set", "stages.0.steps=2", "--set", "stages.1.steps=2"])
    assert code == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"demo.safetensors", "tok1.safetensors", "demo.config.toml", "demo.log.jsonl"} <= names
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["demo-before-after.png"] + [f"demo-{tag}-{i}.png" for tag in ("final", "first") for i in range(3)]
    from PIL import Image

    from pti_plugin.sampling import GRID_GAP, GRID_LABEL_WIDTH

    width, height = Image.open(out / "samples" / "demo-before-after.png").size  # a row before, a row after, 256-px cells
    assert width == GRID_LABEL_WIDTH + 3 * (256 + GRID_GAP) and 2 * 256 < height < 3 * 256
    data = list((tmp_path / "cache").glob("toy-character-*/*_tok1/*.png"))
    assert len(data) >= 4  # the generated character set in kohya layout
