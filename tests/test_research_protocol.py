"""The research protocol (toy world): H1 cells, their statistics and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pti_plugin.protocol.h1_inversion import EDIT_TEMPLATES, edit_records, neutral_records
from pti_plugin.protocol.h1_summary import summarise_h1
from pti_plugin.toy_world.world import CELL_CENTRES, render_character, render_scene, Scene


def _cell(lr, seed, coarse_p, joint_p, angle, rng, n=64):
    draw = lambda p: rng.binomial(1, p, n).tolist()  # noqa: E731
    return {"lr": lr, "seed": seed, "vectors": 1, "steps": 1000, "coarse": draw(coarse_p), "detail": draw(0.0),
            "appearance_error": rng.uniform(0.1, 0.2, n).tolist(), "joint_edit": draw(joint_p), "edit": draw(0.9), "joint_background_edit": draw(joint_p),
            "in_training_cell": draw(1 / 3), "has_object": [1] * n,
            "movement": {"pivot_l2_from_init": angle / 100, "pivot_angle_from_init_deg": angle,
                         "output_angle_layernorm_deg": angle}}


def _grid(joint_far, plateau=0.8, seeds=(42, 1, 2), rng_seed=0):
    """Coarse reconstruction a step at the third rate; joint editability ``plateau`` from there, then ``joint_far``."""
    rng = np.random.default_rng(rng_seed)
    shape = [(1e-5, 0.0, 0.0, 1.0), (2e-5, 0.02, 0.02, 2.0), (3e-5, 0.9, plateau, 3.0), (1e-4, 1.0, plateau, 6.0),
             (1e-3, 1.0, plateau, 10.0), (1e-2, 1.0, joint_far, 14.0)]
    return [_cell(lr, s, c, j, a + 0.1 * k, rng) for k, s in enumerate(seeds) for lr, c, j, a in shape]


def _null(rng_seed=0, n=64):
    rng = np.random.default_rng(rng_seed)
    return {name: {"in_training_cell": rng.binomial(1, 1 / 3, n).tolist()} for name in ("a", "b")}


def test_h1_summary_intervals_are_ordered_and_reproducible():
    cells = _grid(0.1)
    first, again = summarise_h1(_null(), cells, draws=300), summarise_h1(_null(), cells, draws=300)
    assert json.dumps(first, default=str) == json.dumps(again, default=str)  # the bootstrap is seeded
    for row in first["rows"]:
        assert row["n_seeds"] == 3
        for key in ("coarse", "joint_edit", "appearance_error", "in_training_cell", "training_cell_excess"):
            assert row[key]["lo"] <= row[key]["estimate"] <= row[key]["hi"], (row["lr"], key)
    null = first["null"]
    assert null["difference_b_minus_a"]["lo"] <= 0.0 <= null["difference_b_minus_a"]["hi"]


def test_h1_verdict_follows_the_joint_editability_at_the_farthest_pivot():
    lost = summarise_h1(_null(), _grid(0.1), draws=500)
    assert lost["verdict"]["verdict"] == "supported"
    assert lost["verdict"]["editability_drops"]["joint_edit"]["farthest_minus_best"]["hi"] < 0
    knee = lost["knees"]["output_angle_layernorm_deg"]
    assert 2.0 <= knee["knee_x"] <= 6.5  # the step in reconstruction sits between the 2nd and 4th rate
    kept = summarise_h1(_null(), _grid(1.0, plateau=1.0), draws=500)
    assert kept["verdict"]["verdict"] == "not supported"  # editability never falls: no trade-off
    collapsed = _grid(1.0, plateau=1.0) + [_cell(1e-1, s, 0.3, 0.1, 90.0, np.random.default_rng(s)) for s in (42, 1, 2)]
    after_collapse = summarise_h1(_null(), collapsed, draws=500)["verdict"]
    assert after_collapse["collapse_lr"] == 1e-1  # reconstruction 0.3 of 1.0: left out of the verdict
    assert after_collapse["verdict"] == "not supported"
    noisy = summarise_h1(_null(), _grid(0.6, plateau=0.8), draws=500)
    assert noisy["verdict"]["verdict"] in ("supported", "inconclusive")


def _at(cell):
    return {"cx": CELL_CENTRES[cell[1]], "cy": CELL_CENTRES[cell[0]]}


def test_edit_records_require_the_asked_cell_and_the_character():
    prompt = EDIT_TEMPLATES[0].format("tok1")  # top right: row 0, column 2
    character_there = render_character(**_at((0, 2)))
    character_elsewhere = render_character(**_at((2, 0)))
    square_there = render_scene(Scene("square", "red", "white", 0, 2, CELL_CENTRES[2], CELL_CENTRES[0], 11.0))
    images = np.stack([character_there, character_elsewhere, square_there])
    records = edit_records([prompt] * 3, images)
    assert records == {"edit": [1, 0, 1], "joint_edit": [1, 0, 0]}
    neutral = neutral_records(images, ["a tok1 on a white background", "a tok1 on a black background", "a tok1"])
    assert neutral["coarse"] == [1, 1, 0] and neutral["detail"] == [1, 1, 0]
    assert neutral["background_edit"] == [1, 0, None] and neutral["joint_background_edit"] == [1, 0, None]
    assert neutral["in_training_cell"] == [0, 0, 0] and neutral["has_object"] == [1, 1, 1]


@pytest.fixture(scope="module")
def quick_protocol(tmp_path_factory):
    """The whole protocol at --quick on the shipped weights (h1, h2, learning curves, h3, report)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "analysis"))
    import research_protocol

    out, results = tmp_path_factory.mktemp("protocol"), tmp_path_factory.mktemp("results")
    research_protocol.main(["all", "--quick", "--out", str(out), "--results", str(results), "--draws", "200"])
    return out, results


def test_quick_protocol_measures_the_null_on_disjoint_seeds(quick_protocol):
    out, _ = quick_protocol
    null = json.loads((out / "h1" / "parts" / "null.json").read_text())
    images = np.load(out / "h1" / "parts" / "null.npz")["images"]
    n = len(null["a"]["coarse"])
    assert len(null["b"]["coarse"]) == n and images.shape[0] == 2 * n
    assert not np.array_equal(images[:n], images[n:])  # other seeds, other images


def test_sample_seeds_are_absolute_so_null_sets_are_disjoint():
    from pathlib import Path

    from pti_plugin.embedded_default import default_model_dir
    from pti_plugin.protocol.premise import PremiseSettings, encode_text, load_base, neutral_prompts, sample

    base, pipe = load_base(Path(default_model_dir()))
    settings = PremiseSettings(sample_steps=2)
    cond, uncond = encode_text(base, neutral_prompts("rono", 4)), encode_text(base, [""])
    four = sample(pipe, cond, uncond, settings)
    last_two = sample(pipe, cond[2:], uncond, settings, first_seed=2)
    # A batch of 2 sums in another order than a batch of 4: on some CPUs a pixel lands one uint8 level
    # apart. A wrong seed changes the whole image.
    off_by = np.abs(four[2:].astype(int) - last_two.astype(int))
    assert off_by.max() <= 1 and off_by.mean() < 0.01
    wrong_seeds = sample(pipe, cond[2:], uncond, settings, first_seed=0)
    assert np.abs(four[2:].astype(int) - wrong_seeds.astype(int)).mean() > 1


def test_quick_protocol_report_holds_every_table_and_plot(quick_protocol):
    out, results = quick_protocol
    summary = json.loads((results / "h1_summary.json").read_text())
    assert [r["lr"] for r in summary["rows"]] == [1e-4, 1e-2] and all(r["n_seeds"] == 2 for r in summary["rows"])
    assert summary["null"] is not None and summary["vectors"]
    for name in ("h1.png", "h1_points.csv", "report.md", "report.html"):
        assert (results / name).stat().st_size > 0, name
    for name in ("h2_curves-lr0.001.png", "h2_curves-lr0.001.json", "h3.png", "h3_cells.png", "h3_summary.json",
                 "h3_detail_axis.png", "h3_detail_axis.json"):
        assert (results / name).stat().st_size > 0, name
    archived = json.loads((results / "h3_cell_records.json").read_text())["cells"]
    assert archived and all(len(c["true_size_detail"]) == len(c["coarse"]) for c in archived)  # read from the images
    assert not any("detail_pixels" in c for c in archived)  # read with them, but only detail_size.py uses it
    page = (results / "report.html").read_text()
    plots = 5  # h1.png, the H2 curves of the one quick rate, h3.png, h3_cells.png, h3_detail_axis.png
    assert page.count("<img src=\"data:image/png;base64,") == len(list((results / "grids").glob("*.png"))) + plots
    assert 'src="http' not in page and 'href="http' not in page and "Verdict" in page  # self-contained
    h2_runs = sorted((out / "h2" / "runs").glob("lora-*"))
    assert len([p for p in h2_runs if p.is_dir()]) == 2  # one lr x two training seeds, each from its own pivot


def test_train_run_keeps_one_preset_file_per_run_even_with_dotted_names(tmp_path, monkeypatch):
    """Two runs whose names differ only after a dot ("lr2.5e-05", "lr2.75e-05") must not share a preset
    file: two processes of one sweep would train each other's settings."""
    from pathlib import Path

    import toml

    import pti_plugin.cli
    from pti_plugin.protocol.premise import train_run

    trained = []

    def fake_main(argv):
        preset = toml.load(argv[argv.index("--preset") + 1])
        trained.append(preset)
        (Path(preset["output_dir"]) / "premise.safetensors").write_bytes(b"")
        return 0

    monkeypatch.setattr(pti_plugin.cli, "main", fake_main)
    first, second = tmp_path / "runs" / "inversion-lr2.5e-05-seed1-aaa", tmp_path / "runs" / "inversion-lr2.75e-05-seed1-bbb"
    (tmp_path / "runs").mkdir()
    train_run({"seed": 1, "learning_rate": 2.5e-5}, first, lambda s: None)
    train_run({"seed": 1, "learning_rate": 2.75e-5}, second, lambda s: None)
    files = sorted(p.name for p in (tmp_path / "runs").glob("*.toml"))
    assert files == sorted([f"{first.name}.toml", f"{second.name}.toml"])
    assert toml.load(tmp_path / "runs" / f"{first.name}.toml")["learning_rate"] == 2.5e-5


def test_train_run_leaves_a_run_another_process_is_training(tmp_path, monkeypatch):
    """Two processes asked for the same unfinished cell: the second must not delete the first's folder
    (and its lock) and train over it; it is refused, naming the process, and the folder is left alone."""
    import pti_plugin.cli
    from pti_plugin.config import ConfigError
    from pti_plugin.run_lock import RunLock
    from pti_plugin.protocol.premise import train_run

    monkeypatch.setattr(pti_plugin.cli, "main", lambda argv: pytest.fail("trained over a running run"))
    run_dir = tmp_path / "runs" / "h3-none-lr0.001-seed1-aaa"
    run_dir.mkdir(parents=True)
    (run_dir / "premise.log.jsonl").write_text("step 435\n")
    with RunLock(run_dir, "premise"):  # the first process, still training
        with pytest.raises(ConfigError, match=f"another run is writing to {run_dir}"):
            train_run({"seed": 1, "output_name": "premise"}, run_dir, lambda s: None)
        assert (run_dir / "premise.log.jsonl").read_text() == "step 435\n"


def test_h2_reading_needs_position_to_leave_the_null_band():
    from pti_plugin.protocol.protocol_report import h2_verdict

    def summary(position_runs, lo, hi):
        return {"position": {"per_run": position_runs}, "steps_ratio": {"ratio": {"estimate": (lo + hi) / 2,
                                                                                  "lo": lo, "hi": hi}}}

    flat = [[0.3, 0.35, 0.3, 0.4, 0.38], [0.33, 0.3, 0.36, 0.34, 0.4]]
    risen = [[0.3, 0.35, 0.6, 0.9, 0.9], [0.33, 0.4, 0.7, 0.85, 0.9]]
    assert h2_verdict(summary(flat, 2.0, 5.0), null_hi=0.47).startswith("position not learned")
    assert h2_verdict(summary(risen, 2.0, 5.0), null_hi=0.47) == "holds"
    assert h2_verdict(summary(risen, 0.5, 0.9), null_hi=0.47) == "does not hold"
    assert h2_verdict(summary(risen, 0.8, 1.5), null_hi=0.47) == "inconclusive"
    assert h2_verdict(summary([risen[0], flat[0]], 2.0, 5.0), null_hi=0.47).startswith("inconclusive")
    # read on the ratio with T_app at least the first save, where the summary has it
    bounded = summary(risen, 2.0, 5.0) | {"steps_ratio_from_first_save": summary(risen, 0.8, 1.5)["steps_ratio"]}
    assert h2_verdict(bounded, null_hi=0.47) == "inconclusive"


def test_h2_row_gives_no_times_where_position_stays_inside_the_null():
    from pti_plugin.protocol.protocol_report import h2_lines

    def record(position_runs):
        ratio = {"t_app": [5.0, 5.0], "t_pos": [8.0, 8.0], "ratios": [1.6, 1.6], "excluded": [],
                 "ratio": {"estimate": 1.6, "lo": 1.6, "hi": 1.6}}
        return {"summary": {"n_runs": 2, "steps": [0.0, 10.0, 20.0, 30.0, 40.0], "first_step": 0.0,
                            "appearance": {"per_run": [[0.4, 0.9, 1.0, 1.0, 1.0]] * 2},
                            "position": {"per_run": position_runs}, "t_app_mean": 5.0, "t_pos_mean": 8.0,
                            "steps_ratio": ratio, "delta_norm_ratio": ratio}}

    flat = [[0.3, 0.35, 0.3, 0.4, 0.38], [0.33, 0.3, 0.36, 0.34, 0.4]]
    risen = [[0.3, 0.35, 0.6, 0.9, 0.9], [0.33, 0.4, 0.7, 0.85, 0.9]]
    flat_row, risen_row = h2_lines({"0.01": record(flat), "0.001": record(risen)}, null_hi=0.47)[2:]
    assert flat_row.endswith("| 5 | n/a | n/a | n/a | position not learned (no run's plateau above the null): "
                             "T_pos undefined |")
    assert risen_row.endswith("| 5 | 8 | 1.60 [1.60, 1.60] | 1.60 [1.60, 1.60] | holds |")
    assert "| 4, first at step 10 |" in flat_row
    # steps count from the LoRA stage's start, wherever that start lies in the run (first_step is absolute)
    later = record(risen)
    later["summary"]["first_step"] = 1000.0
    assert "| 4, first at step 10 |" in h2_lines({"0.001": later}, null_hi=0.47)[2]


def test_h2_verdict_combines_the_rates_readings():
    from pti_plugin.protocol.protocol_report import h2_overall

    assert h2_overall({"0.001": "holds", "0.01": "inconclusive: position learned in 1 of 3 runs"}).startswith(
        "**Verdict: supported.** holds at lr 0.001; inconclusive: position learned in 1 of 3 runs at lr 0.01.")
    assert h2_overall({"0.001": "does not hold", "0.003": "inconclusive"}).startswith("**Verdict: not supported.**")
    assert h2_overall({"0.001": "holds", "0.003": "does not hold"}).startswith(
        "**Verdict: inconclusive.** holds at lr 0.001; does not hold at lr 0.003.")
    assert h2_overall({"0.001": "position not learned (no run's plateau above the null): T_pos undefined"}).startswith(
        "**Verdict: inconclusive.**")


def test_report_rebuilt_without_the_runs_keeps_the_committed_results(quick_protocol, tmp_path):
    """A fresh clone has the committed results but no training runs: rebuilding the report there must
    keep H1's table and every H2 row, not drop them."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import research_protocol

    _, results = quick_protocol
    committed = tmp_path / "results"
    shutil.copytree(results, committed)
    before = (committed / "report.md").read_text()
    h2_part = before.split("## H2")[1].split("\n## ")[0]
    h2_rows = [line for line in h2_part.splitlines() if line.startswith("| 0.")]
    empty = tmp_path / "empty_out"
    (empty / "h1").mkdir(parents=True)
    research_protocol.main(["report", "--quick", "--out", str(empty), "--results", str(committed), "--draws", "200"])
    after = (committed / "report.md").read_text()
    h1_table = [line for line in before.splitlines() if line.startswith("| 0.0001 |") or line.startswith("| 0.01 |")]
    assert len(h1_table) == 2 and all(line in after.splitlines() for line in h1_table)
    assert h2_rows and all(line in after.splitlines() for line in h2_rows)  # from the copied curve files alone
    assert json.loads((committed / "h1_summary.json").read_text()) == json.loads((results / "h1_summary.json").read_text())
    # H3 from the cell archive alone: the same figures as from the runs
    assert json.loads((committed / "h3_summary.json").read_text()) == json.loads((results / "h3_summary.json").read_text())


def test_h3_verdict_reads_the_paired_difference_interval():
    from pti_plugin.protocol.h3_lines import verdict

    def summary(lo, hi, reaching=3, paired=3):
        entry = {"seeds_reaching": reaching,
                 "leakage_minus_none": {"estimate": (lo + hi) / 2, "lo": lo, "hi": hi, "n_paired": paired}}
        return {"variants": {"half_angle": {"matched": {"0.8": entry}}}}

    assert verdict(summary(-0.4, -0.1)).startswith("supported")
    assert verdict(summary(0.0, 0.2)).startswith("not supported")
    assert verdict(summary(-0.2, 0.1)).startswith("inconclusive")
    assert verdict(summary(-0.4, -0.1, reaching=1)).startswith("inconclusive")
    assert verdict({"variants": {}}).startswith("inconclusive")
    full = {"variants": {"half_angle": {"chosen": {"weight": 100.0},
                                        "matched": summary(-0.4, -0.1)["variants"]["half_angle"]["matched"]}}}
    assert verdict(full).endswith("(weight 100, 3 training seeds paired)")


def test_seeds_outside_the_default_grid_add_training_seeds():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import research_protocol

    settings = research_protocol.h3_settings(research_protocol.parse_args(["h3", "--quick", "--seeds", "7,8"]))
    assert {seed for *_, seed in settings.cells()} == {7, 8}  # not filtered away: the default grid has 42, 1
    with pytest.raises(SystemExit, match="--seeds"):
        research_protocol.h3_settings(research_protocol.parse_args(["h3", "--seeds", "3,x"]))


@pytest.mark.parametrize("argv, message", [
    (["--lrs", "1e-3,-1"], "--lrs: expected positive finite numbers, got -1.0"),
    (["--lrs", "inf"], "--lrs: expected positive finite numbers, got inf"),
    (["--weights", "half_angle=10,0"], "--weights half_angle: expected positive finite numbers, got 0.0"),
    (["--seeds", "1,-2"], "--seeds takes integers >= 0, got -2"),
])
def test_a_grid_value_the_protocol_cannot_train_is_refused_naming_its_flag(argv, message):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import research_protocol

    with pytest.raises(SystemExit, match=message):
        research_protocol.h3_settings(research_protocol.parse_args(["h3", *argv]))


def test_a_missing_pivot_names_how_to_train_it_or_wait(tmp_path):
    """No pivot and no wait: a message naming the file, the part that trains it and ``--wait`` (the CLI exits
    with it, no traceback)."""
    from pti_plugin.protocol.h2_runs import wait_for

    missing = tmp_path / "h1" / "runs" / "cell" / "tok1.safetensors"
    with pytest.raises(FileNotFoundError, match=r"tok1\.safetensors: the pivot .*research_protocol\.py h1 .*--wait"):
        wait_for(missing, print)
    missing.parent.mkdir(parents=True)
    missing.write_bytes(b"x")
    assert wait_for(missing, print) == missing


def _partial_rerun(quick_protocol, tmp_path, keep_archive: bool):
    """The report rebuilt from a copy of the committed results and a working folder that lost every H1
    and H3 cell but one of each (a machine that kept only the newest runs); returns (before, after)
    results folders."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import research_protocol

    out, results = quick_protocol
    committed, partial = tmp_path / "results", tmp_path / "out"
    shutil.copytree(results, committed)
    shutil.copytree(out, partial)
    if not keep_archive:
        for archive in ("h1_cell_records.json", "h3_cell_records.json"):
            (committed / archive).unlink()
    h3_cells = sorted((partial / "h3" / "parts").glob("h3-*-lr*.json"))
    h1_cells = sorted((partial / "h1" / "parts").glob("inversion-*.json"))
    assert len(h3_cells) == 4 and len(h1_cells) > 4
    for part in h3_cells[1:] + h1_cells[1:]:
        for lost in part.parent.glob(part.stem + ".*"):
            lost.unlink()
    research_protocol.main(["report", "--quick", "--out", str(partial), "--results", str(committed), "--draws", "200"])
    return results, committed


def test_a_partial_rerun_summarises_the_archived_cells_too(quick_protocol, tmp_path):
    results, committed = _partial_rerun(quick_protocol, tmp_path, keep_archive=True)
    assert json.loads((committed / "h1_summary.json").read_text()) == json.loads((results / "h1_summary.json").read_text())
    before = json.loads((results / "h3_summary.json").read_text())
    assert before["n_cells"] == 4
    assert json.loads((committed / "h3_summary.json").read_text()) == before  # the same cells, the same figures
    assert sorted(p.name for p in (committed / "grids").glob("h3-*.png")) == \
        sorted(p.name for p in (results / "grids").glob("h3-*.png"))
    archive = json.loads((committed / "h3_cell_records.json").read_text())
    assert len([c for c in archive["cells"] if c["lr"] > 0]) == 4 and archive["null"]["a"]["cell"]


def test_a_partial_rerun_keeps_summaries_from_before_the_archive(quick_protocol, tmp_path):
    results, committed = _partial_rerun(quick_protocol, tmp_path, keep_archive=False)
    assert json.loads((committed / "h1_summary.json").read_text()) == json.loads((results / "h1_summary.json").read_text())
    assert "this working folder and the cell archive hold 1 of the 4 1-vector cells" in (committed / "report.md").read_text()
    assert json.loads((committed / "h3_summary.json").read_text()) == json.loads((results / "h3_summary.json").read_text())
    assert "From the committed `h3_summary.json` over 4 cells" in (committed / "report.md").read_text()
    assert sorted(p.name for p in (committed / "grids").glob("h3-*.png")) == \
        sorted(p.name for p in (results / "grids").glob("h3-*.png"))
    archive = json.loads((committed / "h3_cell_records.json").read_text())
    assert len([c for c in archive["cells"] if c["lr"] > 0]) == 1  # the rerun's cell starts the archive


def test_cells_measured_otherwise_are_refused_and_the_archive_is_left_alone(quick_protocol, tmp_path):
    """A working folder sampled with other settings (a --quick run, another model) must not replace the
    archived cells of the same name."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import research_protocol

    out, results = quick_protocol
    committed, other = tmp_path / "results", tmp_path / "out"
    shutil.copytree(results, committed)
    shutil.copytree(out, other)
    archive = (committed / "h3_cell_records.json").read_bytes()
    report = ["report", "--quick", "--out", str(other), "--results", str(committed), "--draws", "200"]
    for k, part in enumerate(sorted((other / "h3" / "parts").glob("h3-*-lr*.json"))):
        record = json.loads(part.read_text())
        record["settings"]["seeds"] += 1  # as if sampled with another seed count
        part.write_text(json.dumps(record))
        if k == 0:  # one cell measured otherwise: the working folder itself is mixed
            with pytest.raises(SystemExit, match="measured in 2 different ways"):
                research_protocol.main(report)
    with pytest.raises(SystemExit, match="h3_cell_records.json archives cells measured with"):
        research_protocol.main(report)
    assert (committed / "h3_cell_records.json").read_bytes() == archive


def test_h3_trains_only_the_cells_the_archive_lacks(quick_protocol, tmp_path):
    """A clone (another working folder, no runs) asked for the grid trains only what the cell archive
    does not hold as trained and measured alike; the fingerprint does not depend on the folder."""
    import shutil
    from pathlib import Path

    import toml

    from pti_plugin.protocol.cell_archive import trained_with
    from pti_plugin.protocol.h3_variants import H3Settings, run_h3
    from pti_plugin.toy_world import WEIGHTS_DIR

    out, results = quick_protocol
    base = toml.load(Path(__file__).resolve().parents[1] / "presets" / "research_bench.toml")
    committed = tmp_path / "results"
    shutil.copytree(results, committed)
    archive_path = committed / "h3_cell_records.json"

    logs: list[str] = []  # everything archived: nothing trained, and no pivot needed (this clone has no H1)
    assert run_h3(WEIGHTS_DIR, tmp_path / "clone" / "h3", base, H3Settings.quick(), log=logs.append,
                  h1_out=tmp_path / "clone" / "h1", archive=archive_path) == []
    assert not (tmp_path / "clone" / "h3" / "runs").exists()
    assert any("4 of 4 cells are in the cell archive" in line for line in logs)

    archive = json.loads(archive_path.read_text())
    tampered = next(c for c in archive["cells"] if c["lr"] > 0 and c["variant"] == "half_angle" and c["seed"] == 1)
    original, tampered["trained_with"] = tampered["trained_with"], "0" * 12  # as if trained from another preset
    archive_path.write_text(json.dumps(archive))
    logs.clear()
    cells = run_h3(WEIGHTS_DIR, tmp_path / "other" / "h3", base, H3Settings.quick(), log=logs.append,
                   h1_out=out / "h1", archive=archive_path)
    assert [(c["variant"], c["seed"]) for c in cells] == [("half_angle", 1)]
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "other" / "h3" / "runs").iterdir() if p.is_dir()] == \
        ["h3-half_angle-w10-lr0.001-seed1"]
    assert any("3 of 4 cells are in the cell archive" in line for line in logs)
    part = json.loads((tmp_path / "other" / "h3" / "parts" / "h3-half_angle-w10-lr0.001-seed1.json").read_text())
    assert trained_with(part["settings"]["preset"]) == original  # other folder, same fingerprint
    assert part["settings"]["preset"]["train_data_dir"] != str(out / "h3" / "data")


def test_h1_trains_only_the_pivots_and_the_cells_the_archive_lacks(quick_protocol, tmp_path):
    """H1 on a clone: the archived cells are not trained again, except the pivots (H2 and H3 train from
    their files), which are trained where the clone's H2 and H3 look for them."""
    import shutil
    from pathlib import Path

    import toml

    from pti_plugin.toy_world import WEIGHTS_DIR
    from pti_plugin.protocol.h1_inversion import H1Settings, pivot_file, run_h1

    _, results = quick_protocol
    base = toml.load(Path(__file__).resolve().parents[1] / "presets" / "research_bench.toml")
    committed = tmp_path / "results"
    shutil.copytree(results, committed)
    settings = H1Settings.quick()
    pivot_lr = settings.inversion_lrs[0]
    logs: list[str] = []
    cells = run_h1(WEIGHTS_DIR, tmp_path / "clone" / "h1", base, settings, log=logs.append,
                   archive=committed / "h1_cell_records.json", pivot_lr=pivot_lr)
    assert sorted((c["lr"], c["seed"], c["vectors"]) for c in cells) == \
        sorted((pivot_lr, seed, 1) for seed in settings.training_seeds)
    planned = len(settings.cells())
    assert planned > len(cells)
    assert any(f"{planned - len(cells)} of {planned} cells are in the cell archive" in line for line in logs)
    for seed in settings.training_seeds:
        assert pivot_file(WEIGHTS_DIR, tmp_path / "clone" / "h1", base, settings, pivot_lr, seed).is_file()


def test_the_report_renders_in_a_headless_browser_and_a_broken_image_is_caught(quick_protocol, tmp_path, capsys):
    """analysis/render_report.py on the quick report in a real headless browser (skipped without one):
    every embedded image decodes and the screenshot has content; the same page with one image's data
    corrupted reports one image fewer (its printed count, from the same browser run) and fails."""
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import render_report

    browser = render_report.find_browser(None)
    if browser is None:
        pytest.skip("no headless browser (apt-get install chromium)")
    _, results = quick_protocol
    page = results / "report.html"
    assert render_report.main([str(page), "--screenshot", str(tmp_path / "shot.png")]) == 0
    assert (tmp_path / "shot.png").stat().st_size > 0
    text = page.read_text()
    total = text.count('src="data:image/png;base64,')
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'(src="data:image/png;base64,)[A-Za-z0-9+/]{64}', r"\1!!!!", text, count=1))
    capsys.readouterr()
    assert render_report.main([str(broken)]) == 1
    assert f"images_loaded={total - 1} images_total={total} " in capsys.readouterr().out


def test_h2_save_schedule_flags_and_the_runs_read_for_a_schedule(tmp_path, capsys):
    """``--save_every`` / ``--dense_until`` set H2's schedule; the curves of a rate read only the runs trained
    on that schedule, not those of the same rate and seed trained on another one beside them."""
    import sys
    from pathlib import Path

    import toml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import research_protocol
    from pti_plugin.protocol.h2_runs import h2_runs_saved_as

    default = research_protocol.h2_settings(research_protocol.parse_args(["h2"]))
    # the protocol's schedule: every 10 steps, except 3e-3 (its look is half-way before step 10): every 2
    assert default.schedule(1e-3).learning_curves_args() == ["--dense_until", "100", "--score_every", "100"]
    assert default.schedule(0.003000000000000001).save_every_n_steps == 2  # a rate read back from a file
    assert default.schedule(3e-3).learning_curves_args() == ["--dense_until", "20", "--score_every_until", "10:100",
                                                             "--score_every", "100"]
    h2 = research_protocol.h2_settings(research_protocol.parse_args(
        ["h2", "--lrs", "3e-3", "--seeds", "1,2", "--save_every", "2", "--dense_until", "20"]))
    assert (h2.lora_lrs, h2.training_seeds, h2.save_every_n_steps, h2.dense_until) == ((3e-3,), (1, 2), 2, 20)
    assert h2.steps == 1000 and h2.score_every == 100  # the rest stays the protocol's
    assert h2.schedule(3e-3).learning_curves_args() == ["--dense_until", "20", "--score_every", "100"]  # as asked
    assert research_protocol.h2_settings(research_protocol.parse_args(["h2", "--save_every", "5"])).schedule(
        3e-3).save_every_n_steps == 5  # a schedule asked for holds for every rate
    for flag in ("--save_every", "--dense_until", "--draws"):  # refused by the parser, before h1 trains anything
        with pytest.raises(SystemExit) as stop:
            research_protocol.main(["all", "--out", str(tmp_path / "never"), flag, "0"])
        assert stop.value.code == 2 and f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()

    runs = tmp_path / "runs"
    for name, every, steps in [("lora-lr0.003-seed1-aaa", 10, 1000), ("lora-lr0.003-seed1-bbb", 2, 1000),
                               ("lora-lr0.003-seed2-ccc", 2, 1000), ("lora-lr0.003-seed2-ddd", 2, 20),
                               ("lora-lr0.003-seed12-eee", 2, 1000), ("lora-lr0.01-seed1-fff", 2, 1000)]:
        (runs / name).mkdir(parents=True)
        preset = {"save_every_n_steps": every, "stages": [{"name": "lora", "kind": "lora", "steps": steps}]}
        (runs / f"{name}.toml").write_text(toml.dumps(preset))
    assert [p.name for p in h2_runs_saved_as(tmp_path, 3e-3, h2)] == ["lora-lr0.003-seed1-bbb", "lora-lr0.003-seed2-ccc"]


def test_the_vector_check_does_not_depend_on_the_order_its_cells_are_read_in():
    """A rebuild reads the cells in the archive's order, not the grid's: the same cells must give the same rows."""
    from pti_plugin.protocol.h1_summary import vector_rows

    rng = np.random.default_rng(0)
    cells = [{"lr": 1e-4, "seed": seed, "vectors": n, **{k: rng.integers(0, 2, 16).astype(float).tolist()
                                                          for k in ("coarse", "joint_edit", "appearance_error")}}
             for seed in (42, 1, 2) for n in (1, 2)]
    assert vector_rows(cells, draws=200) == vector_rows(cells[::-1], draws=200)
