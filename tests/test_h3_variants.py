"""H3 (toy world): LoRA variants at matched reconstruction, the drift record, and the grid end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pti_plugin.protocol.h3_summary import LOST_THE_LOOK, OUTSIDE_NULL, highest_safe_lr, summarise_h3
from pti_plugin.protocol.h3_variants import DRIFT_KEYS, H3Settings, cell_name, drift_records
from pti_plugin.toy_world.world import CELL_CENTRES, Scene, render_character, render_scene

N = 100  # images per cell: every fraction below is a multiple of 1/N, so the means are exact
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = (42, 1, 2)
SEED_OFFSET = {42: 0.0, 1: 0.04, 2: -0.04}  # a training seed's own leakage level, shared by every variant


def _hits(fraction: float) -> list[int]:
    ones = int(round(fraction * N))
    return [1] * ones + [0] * (N - ones)


def _condition(variant, weight, coarse, intercept, jitter=None):
    """Cells whose leakage is ``intercept + 0.4 coarse`` (+ the seed's offset and ``jitter[seed]``) at each rate."""
    cells = []
    for seed in SEEDS:
        for lr, c in zip(LRS, coarse):
            leak = intercept + 0.4 * c + SEED_OFFSET[seed] + (jitter or {}).get(seed, 0.0)
            cells.append({"variant": variant, "weight": weight, "lr": lr, "seed": seed, "steps": 1000,
                          "coarse": _hits(c), "in_training_cell": _hits(leak), "appearance_error": [0.1] * N,
                          "drift": _hits(0.1), "drift_cell": _hits(0.05)})
    return cells


def _null():
    return {name: {"in_training_cell": _hits(0.33)} for name in ("a", "b")}


def _synthetic_grid():
    # "none" reaches coarse 0.8 at an lr where half_angle is still at 0.55: only matching makes them comparable
    return (_condition("none", None, (0.3, 0.7, 0.9, 0.95), 0.3)
            # 0.2 lower at every coarse level (per-seed differences -0.2, -0.19, -0.21)
            + _condition("half_angle", 1.0, (0.1, 0.4, 0.7, 0.9), 0.1, {1: 0.01, 2: -0.01})
            # 0.1 lower: not the chosen weight
            + _condition("half_angle", 10.0, (0.1, 0.4, 0.7, 0.9), 0.2)
            # lowest leakage of all, but never reaches coarse 0.8: cannot be chosen
            + _condition("half_angle", 100.0, (0.05, 0.1, 0.2, 0.5), 0.05)
            # equal to "none" on average (per-seed differences 0, +0.02, -0.02)
            + _condition("class_endpoint", 1.0, (0.2, 0.6, 0.85, 0.95), 0.3, {1: 0.02, 2: -0.02}))


def test_leakage_at_matched_reconstruction_is_paired_against_none():
    summary = summarise_h3(_null(), _synthetic_grid(), draws=500)
    by = {(c["variant"], c["weight"]): c for c in summary["conditions"]}
    lower = by[("half_angle", 1.0)]["matched"]["0.8"]
    assert lower["leakage_minus_none"]["estimate"] == pytest.approx(-0.2, abs=1e-9)
    assert lower["leakage_minus_none"]["hi"] < 0  # the paired interval excludes 0
    assert lower["leakage_minus_none"]["n_paired"] == 3  # seeds 42, 1, 2 reach coarse 0.8 on both sides
    assert lower["leakage"]["estimate"] == pytest.approx(0.1 + 0.32, abs=1e-9)
    none = by[("none", None)]["matched"]["0.8"]
    assert none["leakage_excess"]["estimate"] == pytest.approx(0.3 + 0.32 - 0.33, abs=1e-9)
    equal = by[("class_endpoint", 1.0)]["matched"]["0.8"]["leakage_minus_none"]
    assert equal["estimate"] == pytest.approx(0.0, abs=1e-9) and equal["lo"] <= 0 <= equal["hi"]
    assert by[("half_angle", 100.0)]["matched"]["0.8"]["seeds_reaching"] == 0
    assert summary["variants"]["half_angle"]["chosen"]["weight"] == 1.0
    assert summary["variants"]["half_angle"]["chosen"]["mean_leakage"] == pytest.approx(0.42, abs=1e-9)
    assert by[("half_angle", 1.0)]["matched"]["0.8"]["drift_minus_none"]["estimate"] == pytest.approx(0.0, abs=1e-9)
    json.dumps(summary, allow_nan=False)  # JSON-ready


def test_a_weight_with_extra_training_seeds_is_chosen_on_the_seeds_all_weights_have():
    # weight 10 leaks 0.1 more than weight 1 on the shared seeds; two extra seeds of weight 10 alone
    # leak far less and reach coarse 0.8, which would win on seed count and mean if they counted
    extra = [cell | {"seed": seed, "in_training_cell": _hits(0.0)}
             for seed in (3, 4) for cell in _condition("half_angle", 10.0, (0.1, 0.4, 0.7, 0.9), 0.2) if cell["seed"] == 42]
    cells = (_condition("half_angle", 1.0, (0.1, 0.4, 0.7, 0.9), 0.1)
             + _condition("half_angle", 10.0, (0.1, 0.4, 0.7, 0.9), 0.2) + extra)
    chosen = summarise_h3(_null(), cells, draws=100)["variants"]["half_angle"]["chosen"]
    assert chosen["weight"] == 1.0 and chosen["seeds_reaching"] == 3
    assert chosen["mean_leakage"] == pytest.approx(0.42, abs=1e-9)


def test_highest_safe_lr_stops_at_the_first_rate_outside_the_null():
    rows = [{"lr": lr, "inside_null": inside, "appearance_error": {"estimate": lr}}
            for lr, inside in ((1e-3, True), (2e-3, True), (3e-3, False), (6e-3, True))]
    assert highest_safe_lr(rows) == {"lr": 2e-3, "appearance_error": {"estimate": 2e-3},
                                     "stopped_at": {"lr": 3e-3, "reason": OUTSIDE_NULL}}
    assert highest_safe_lr([dict(rows[2])])["lr"] is None
    assert highest_safe_lr(rows[:2])["stopped_at"] is None  # every rate passed


def test_highest_safe_lr_stops_where_the_run_draws_no_better_than_the_pivot_alone():
    """The lr 1e-2 runs break: their layout falls back into the null with the look. A rate whose coarse
    interval reaches down to the pivot alone's estimate (0.60) ends the search even though it is inside
    the null; one whose interval stays above it (lo 0.61) does not."""
    def row(lr, coarse_lo):
        return {"lr": lr, "inside_null": True, "appearance_error": {"estimate": lr},
                "coarse": {"estimate": coarse_lo + 0.1, "lo": coarse_lo, "hi": coarse_lo + 0.2}}

    pivot_alone = {"lr": 0.0, "inside_null": True, "appearance_error": {"estimate": 0.0},
                   "coarse": {"estimate": 0.60, "lo": 0.50, "hi": 0.70}}
    rows = [pivot_alone, row(1e-3, 0.80), row(3e-3, 0.61), row(1e-2, 0.60), row(3e-2, 0.90)]
    assert highest_safe_lr(rows) == {"lr": 3e-3, "appearance_error": {"estimate": 3e-3},
                                     "stopped_at": {"lr": 1e-2, "reason": LOST_THE_LOOK}}
    assert highest_safe_lr(rows[1:])["lr"] == 3e-2  # without the pivot alone's row there is nothing to compare
    # a rate too low to have learned the look yet loses nothing: the search goes on past it
    too_low = [pivot_alone, row(1e-5, 0.55), row(1e-3, 0.80), row(3e-3, 0.60)]
    assert highest_safe_lr(too_low) == {"lr": 1e-3, "appearance_error": {"estimate": 1e-3},
                                        "stopped_at": {"lr": 3e-3, "reason": LOST_THE_LOOK}}


def test_drift_is_a_change_of_detected_shape_colour_or_cell():
    left, right = CELL_CENTRES[0], CELL_CENTRES[2]
    square = render_scene(Scene("square", "red", "white", 0, 0, left, left, 11.0))
    moved = render_scene(Scene("square", "red", "white", 2, 2, right, right, 11.0))
    triangle = render_scene(Scene("triangle", "red", "white", 0, 0, left, left, 11.0))
    character, character_moved = render_character(left, left), render_character(right, left)
    on = np.stack([square, square, triangle, character, character_moved])
    off = np.stack([square, moved, square, character, character])
    records = drift_records(on, off)
    assert records["drift"] == [0, 1, 1, 0, 1]
    assert records["drift_cell"] == [0, 1, 0, 0, 1]


@pytest.fixture(scope="module")
def quick_h3(tmp_path_factory):
    """The quick H1 pivots (only the rate H3 starts from), then the quick H3 grid into the same folder."""
    import toml

    from pti_plugin.embedded_default import default_model_dir
    from pti_plugin.protocol.h1_inversion import H1Settings, run_h1
    from pti_plugin.protocol.h3_variants import run_h3

    out = tmp_path_factory.mktemp("h3")
    base = toml.load(Path(__file__).resolve().parents[1] / "presets" / "research_bench.toml")
    model = Path(default_model_dir())
    settings = H3Settings.quick()
    assert settings.pivot_lr == H1Settings.quick().inversion_lrs[0]
    run_h1(model, out, base, dataclasses.replace(settings.h1, inversion_lrs=(settings.pivot_lr,), vector_counts=()),
           log=lambda text: None)
    cells = run_h3(model, out, base, settings, log=lambda text: None)
    return out, settings, cells


def test_quick_h3_measures_every_cell(quick_h3):
    from pti_plugin.protocol.h1_inversion import load_cells
    from pti_plugin.protocol.h3_variants import load_h3_cells

    out, settings, cells = quick_h3
    assert len(cells) == len(settings.cells()) == 4
    for variant, weight, lr, seed in settings.cells():
        part = json.loads((out / "parts" / f"{cell_name(variant, weight, lr, seed)}.json").read_text())
        for key in DRIFT_KEYS + ("coarse", "in_training_cell", "appearance_error"):
            assert len(part[key]) == settings.seeds
    assert len(load_h3_cells(out, settings)) == 4
    null, _ = load_cells(out, settings.h1)
    summary = summarise_h3(null, load_h3_cells(out, settings), draws=100)
    assert {c["variant"] for c in summary["conditions"]} == {"half_angle", "reg_images"}


def test_quick_h3_presets_hold_each_variants_regulariser(quick_h3):
    import toml

    out, settings, _ = quick_h3
    locality = [toml.load(p) for p in sorted((out / "runs").glob("h3-half_angle-*.toml"))]
    assert len(locality) == len(settings.training_seeds)
    for preset in locality:
        options = preset["plugins"]["pivot_locality"]
        assert options["fractions"] == [0.5] and options["fraction_sampling"] == "fixed"
        assert options["weight"] == 10.0 and options["class_words"] == ["character"]
        assert options["latents"] == "batch"  # the base preset's table
        assert Path(preset["weights"]).name == "tok1.safetensors" and Path(preset["weights"]).is_file()
    reg = [toml.load(p) for p in sorted((out / "runs").glob("h3-reg_images-*.toml"))]
    assert len(reg) == len(settings.training_seeds)
    for preset in reg:
        assert preset["plugins"] == {} and preset["prior_loss_weight"] == 1.0
        images = list(Path(preset["reg_data_dir"]).glob("1_character/*.png"))
        assert len(images) == settings.reg_images


def test_measured_cells_are_found_whatever_grid_ran_them(quick_h3):
    from pti_plugin.protocol.h3_variants import load_h3_cells

    out, settings, _ = quick_h3
    by_grid = load_h3_cells(out, settings)
    found = load_h3_cells(out)
    key = lambda c: (c["variant"], c["weight"], c["lr"], c["seed"])  # noqa: E731
    assert sorted(map(key, found)) == sorted(map(key, by_grid)) == sorted(settings.cells())
    (out / "parts" / "h3-none-lr0.5-seed7.json").write_text(json.dumps({"coarse": [1]}))  # unmeasured: no drift
    assert len(load_h3_cells(out)) == len(by_grid)


def test_pivot_joins_every_condition_as_lr_zero_with_no_drift(quick_h3):
    from pti_plugin.protocol.h1_inversion import cell_name as h1_cell_name
    from pti_plugin.protocol.h3_variants import load_h3_cells
    from pti_plugin.protocol.protocol_sections import with_pivot_cells

    out, settings, _ = quick_h3
    cells = load_h3_cells(out, settings)
    joined = with_pivot_cells(cells, out / "parts", settings.pivot_lr)
    added = [c for c in joined if c["lr"] == 0.0]
    assert len(added) == 2 * len(settings.training_seeds)  # two conditions x seeds
    for cell in added:
        pivot = json.loads((out / "parts" / f"{h1_cell_name(settings.pivot_lr, cell['seed'], 1)}.json").read_text())
        assert cell["coarse"] == pivot["coarse"] and set(cell["drift"]) == {0}


def test_band_variant_is_half_angle_with_its_rows_in_the_position_band(tmp_path):
    import toml

    from pti_plugin.protocol.h3_variants import POSITION_BAND, H3Settings, cell_preset

    base = toml.load(Path(__file__).resolve().parents[1] / "presets" / "research_bench.toml")
    pivot = tmp_path / "tok1.safetensors"
    presets = {v: cell_preset(base, tmp_path, tmp_path / "data", H3Settings(), v, 10.0, 1e-3, 42, pivot, None)
               for v in ("half_angle", "half_angle_band")}
    band = presets["half_angle_band"]["plugins"]["pivot_locality"]
    plain = presets["half_angle"]["plugins"]["pivot_locality"]
    assert band.pop("timestep_range") == POSITION_BAND and "timestep_range" not in plain
    assert band == plain and band["fractions"] == [0.5] and band["weight"] == 10.0


def test_drift_splits_the_class_prompt_from_the_unrelated_ones():
    from pti_plugin.protocol.h3_variants import DRIFT_PROMPTS, drift_split
    from pti_plugin.toy_world.world import render_character

    assert DRIFT_PROMPTS[2] == "a character"  # seeds 2, 6, ... use the class prompt
    drift = [10, 11, 12, 13, 14, 15, 16, 17]  # values that name their index
    character = render_character(16.0, 16.0)
    blank = np.full_like(character, 255)
    images = np.stack([blank, blank, character, blank, blank, blank, blank, blank])
    split = drift_split(drift, images)
    assert split["drift_class"] == [12, 16]
    assert split["drift_unrelated"] == [10, 11, 13, 14, 15, 17]
    assert split["class_character"] == [1, 0]  # seed 2 draws the character, seed 6 a blank image
    assert "class_character" not in drift_split(drift, None)


def test_a_rate_is_inside_the_null_when_its_excess_interval_reaches_zero():
    # Leakage 0.33 + 0.4 coarse (+ the seed's offset of up to 0.04): at coarse 0 it is the null's 0.33 on
    # average; at coarse 0.95 it is 0.71, far above.
    summary = summarise_h3(_null(), _condition("none", None, (0.0, 0.3, 0.9, 0.95), 0.33), draws=500)
    rows = summary["conditions"][0]["rows"]
    first, last = rows[0], rows[-1]
    assert first["training_cell_excess"]["lo"] <= 0 <= first["training_cell_excess"]["hi"] and first["inside_null"]
    assert last["training_cell_excess"]["lo"] > 0 and not last["inside_null"]
    assert summary["variants"]["none"]["highest_safe_lr"]["lr"] in LRS[:-2]


def test_detected_cells_name_the_cell_of_each_object():
    from pti_plugin.protocol.h3_lines import cell_counts, detected_cells

    scenes = [render_scene(Scene("circle", "blue", "white", r, c, CELL_CENTRES[c], CELL_CENTRES[r], 11.0))
              for r, c in ((0, 0), (1, 2), (2, 1), (2, 1))]
    blank = np.full_like(scenes[0], 255)
    cells = detected_cells(np.stack([*scenes, blank]))
    assert cells == [0, 5, 7, 7, None]
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[0, 0], expected[1, 2], expected[2, 1] = 1, 1, 2
    assert np.array_equal(cell_counts(cells), expected)


def test_position_entropy_drops_when_the_layout_collapses_onto_a_cell_no_training_image_uses():
    # Every cell once per 9 images at the lowest rate (entropy 1), then every image in the centre cell (entropy 0),
    # which is not a training cell: the training-cell fraction falls to 0 and says nothing of the collapse.
    uniform, centre = list(range(9)) * 11 + [None], [4] * N
    cells = []
    for seed in SEEDS:
        for lr, layout in ((LRS[0], uniform), (LRS[1], centre)):
            cells.append({"variant": "none", "weight": None, "lr": lr, "seed": seed, "coarse": _hits(0.9),
                          "in_training_cell": [None if c is None else int(c in (0, 5, 7)) for c in layout],
                          "appearance_error": [0.1] * N, "drift": _hits(0.1), "drift_cell": _hits(0.0), "cell": layout})
    null = {name: {"in_training_cell": _hits(0.33), "cell": uniform} for name in ("a", "b")}
    summary = summarise_h3(null, cells, draws=200)
    low, high = summary["conditions"][0]["rows"]
    assert low["position_entropy"] == {"estimate": pytest.approx(1.0), "lo": pytest.approx(1.0), "hi": pytest.approx(1.0)}
    assert high["position_entropy"]["estimate"] == 0.0 and high["in_training_cell"]["estimate"] == 0.0
    null_entropy = summary["null_position_entropy"]
    assert null_entropy["estimate"] == pytest.approx(1.0) and 0.8 < null_entropy["lo"] <= null_entropy["hi"] <= 1.0


def test_the_pivot_alone_is_drawn_left_of_every_measured_rate():
    from pti_plugin.protocol.h3_lines import pivot_lr_position

    conditions = [{"rows": [{"lr": 0.0}, {"lr": 1e-5}, {"lr": 1e-3}]}, {"rows": [{"lr": 0.0}, {"lr": 3e-4}]}]
    assert 0 < pivot_lr_position(conditions) < 1e-5


def test_condition_table_has_a_row_per_condition_and_marks_the_chosen_weight():
    from pti_plugin.protocol.h3_lines import condition_table

    summary = summarise_h3(_null(), _synthetic_grid(), draws=200)
    rows = [line for line in condition_table(summary)[2:]]
    assert len(rows) == len(summary["conditions"]) == 5
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert labels.count("half_angle (w 1) (chosen)") == 1  # the rule picks weight 1 (see above)
    assert "half_angle (w 10)" in labels and "half_angle (w 100)" in labels
    half_angle_1 = rows[labels.index("half_angle (w 1) (chosen)")].split(" | ")
    # its paired difference at matched coarse 0.8 is -0.2 (built into the grid), in the last column
    assert half_angle_1[-1].rstrip(" |").startswith("-0.200")
    none = rows[labels.index("none")].split(" | ")
    assert none[1] == "3" and none[-1].rstrip(" |") == "n/a"  # 3 training seeds; no difference with itself
    assert labels[0] == "none"  # the reference comes first


def test_condition_table_shows_the_drift_at_the_highest_safe_rate_not_at_the_read_rate():
    """The column beside the highest safe rate (3e-3) shows that rate's drift (0.46), not the drift at the
    table's fixed rate (0.41), and the rate that stopped the search is named with its reason."""
    from pti_plugin.protocol.h3_lines import condition_table

    def interval(x):
        return {"estimate": x, "lo": x - 0.05, "hi": x + 0.05}

    rows = [{"lr": lr, "n_seeds": 3, "drift_unrelated": interval(d), "drift_class": interval(0.5),
             "appearance_error": interval(0.16), "training_cell_excess": interval(0.05)}
            for lr, d in ((1e-3, 0.41), (3e-3, 0.46), (1e-2, 0.88))]
    condition = {"variant": "half_angle_band", "weight": 10.0, "rows": rows, "matched": {"0.8": {}},
                 "highest_safe_lr": {"lr": 3e-3, "appearance_error": interval(0.223),
                                     "stopped_at": {"lr": 1e-2, "reason": LOST_THE_LOOK}}}
    summary = {"conditions": [condition], "variants": {}}
    head, _, line = condition_table(summary)
    columns = [c.strip() for c in head.strip("|").split("|")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[columns.index("highest safe lr")] == "0.003"
    assert cells[columns.index("unrelated-prompt drift there")] == "0.46 [0.41, 0.51]"
    assert cells[columns.index("search stopped at")] == f"0.01 ({LOST_THE_LOOK})"
    assert cells[columns.index("unrelated-prompt drift at 0.001")] == "0.41 [0.36, 0.46]"


def test_each_condition_of_the_h3_plot_has_its_own_look():
    """Eleven conditions: one panel per variant other than no regulariser, each holding that variant's weights
    and no regulariser (the reference, in every panel), and within a panel no two conditions drawn alike."""
    from pti_plugin.protocol.h3_lines import panel_styles, variant_panels

    grid = [("none", None)] + [(v, w) for v in ("half_angle", "half_angle_band", "uniform_half", "class_endpoint")
                               for w in (10.0, 100.0)] + [("half_angle", 1.0), ("reg_images", 1.0)]
    panels = variant_panels([{"variant": v, "weight": w} for v, w in grid])
    assert [v for v, _ in panels] == ["half_angle", "half_angle_band", "uniform_half", "class_endpoint", "reg_images"]
    half_angle = [(c["variant"], c["weight"]) for c in panels[0][1]]
    assert half_angle == [("none", None), ("half_angle", 10.0), ("half_angle", 100.0), ("half_angle", 1.0)]
    for _, conditions in panels:
        looks = [tuple(sorted(s.items())) for s in panel_styles(conditions)]
        assert len(set(looks)) == len(conditions) and looks[0] == (("color", "black"), ("linestyle", "-"), ("marker", "o"))


def test_reg_images_asked_by_two_processes_at_once_are_made_once(tmp_path, monkeypatch):
    """Two queue workers start the first ``reg_images`` cells together: the second waits for the first's
    images instead of making its own and moving the first's folder aside while its run reads it."""
    import threading
    import time

    from pti_plugin.sweeps import bench

    made = []

    def slow_make(run_dir, class_word, folder, count, args):
        made.append(run_dir)
        time.sleep(0.5)
        folder.mkdir(parents=True)
        for k in range(count):
            (folder / f"{k:03d}.png").write_bytes(b"png")

    monkeypatch.setattr(bench, "_make_reg_images", slow_make)
    reg_dir = tmp_path / "reg"
    results = []
    workers = [threading.Thread(target=lambda name=name: results.append(
        bench.generate_reg_images(Path(name), "character", reg_dir, 3, None))) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(made) == 1
    assert results == [reg_dir, reg_dir]
    assert sorted(p.name for p in reg_dir.iterdir() if p.is_dir()) == ["1_character"]
    assert len(list((reg_dir / "1_character").glob("*.png"))) == 3
