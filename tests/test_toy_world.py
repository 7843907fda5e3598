"""Fast tests of the toy world: rendering, detectors, captions, character dataset, shipped weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pti_plugin.toy_world import WEIGHTS_DIR
from pti_plugin.toy_world.detectors import (
    appearance_error,
    detect,
    detect_character,
    has_detail,
    position_entropy,
    score_generations,
)
from pti_plugin.toy_world.world import (
    BACKGROUNDS,
    CELL_CENTRES,
    CHARACTER_CELLS,
    COLOURS,
    COLUMNS,
    JITTER,
    ROWS,
    SHAPES,
    SIZE_RANGE,
    WORDS,
    Scene,
    make_caption,
    parse_caption,
    quality_prompts,
    render_character,
    render_scene,
    sample_pretraining_scene,
    sample_scene,
    write_character_dataset,
)


def _scene(shape, colour, background, row, col, rng):
    return Scene(
        shape, colour, background, row, col,
        CELL_CENTRES[col] + rng.uniform(-JITTER, JITTER),
        CELL_CENTRES[row] + rng.uniform(-JITTER, JITTER),
        rng.uniform(*SIZE_RANGE),
    )


def test_detectors_recover_every_shape_colour_background_cell():
    rng = np.random.default_rng(0)
    combos = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS, range(3), range(3)))
    correct = {"shape": 0, "colour": 0, "background": 0, "cell": 0}
    for shape, colour, background, row, col in combos:
        scene = _scene(shape, colour, background, row, col, rng)
        img = render_scene(scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        got = detect(img)
        correct["shape"] += got.shape == shape
        correct["colour"] += got.colour == colour
        correct["background"] += got.background == background
        correct["cell"] += (got.row, got.col) == (row, col)
        assert abs(got.centroid[0] - scene.cx) < 0.6  # x centroid = bbox centre (symmetric shapes)
    assert len(combos) == 486
    assert correct == {k: len(combos) for k in correct}  # 100% on every attribute


def test_extreme_sizes_and_jitter_are_detected():
    for shape, (row, col), size, d in itertools.product(SHAPES, [(0, 0), (2, 2), (0, 2)], SIZE_RANGE, (-JITTER, JITTER)):
        scene = Scene(shape, "purple", "gray", row, col, CELL_CENTRES[col] + d, CELL_CENTRES[row] + d, size)
        got = detect(render_scene(scene))
        assert (got.shape, got.colour, got.background, got.row, got.col) == (shape, "purple", "gray", row, col)


def test_empty_image_has_no_object():
    got = detect(np.full((32, 32, 3), 255, dtype=np.uint8))
    assert got.background == "white" and got.shape is None and got.row is None


def test_character_is_found_at_its_cells():
    for row, col in CHARACTER_CELLS:
        img = render_character(CELL_CENTRES[col], CELL_CENTRES[row])
        got = detect(img)
        assert (got.row, got.col, got.background) == (row, col, "white")
        assert len({tuple(p) for p in img.reshape(-1, 3)}) > 3  # two colours + background + rims


def test_character_detector_finds_the_character_and_nothing_else():
    found = []
    for row, col, background in itertools.product(range(3), range(3), BACKGROUNDS):
        got = detect_character(render_character(CELL_CENTRES[col], CELL_CENTRES[row], background))
        found.append(got.is_character and (got.object.row, got.object.col) == (row, col))
        assert (got.top_colour, got.bottom_colour, got.match) == ("orange", "blue", 1.0)
    assert sum(found) == 27
    rng = np.random.default_rng(0)
    assert sum(detect_character(render_scene(sample_scene(rng))).is_character for _ in range(300)) == 0
    flipped = render_character(16.0, 16.0)[::-1]  # blue over orange
    got = detect_character(np.ascontiguousarray(flipped))
    assert (got.top_colour, got.bottom_colour, got.is_character) == ("blue", "orange", False)
    assert got.match == pytest.approx(1 / 3)  # a disc, colours the wrong way round
    empty = detect_character(np.full((32, 32, 3), 255, dtype=np.uint8))
    assert (empty.top_colour, empty.is_character, empty.match) == (None, False, 0.0)


def _jittered_centre(row, col, rng):
    return CELL_CENTRES[col] + rng.uniform(-JITTER, JITTER), CELL_CENTRES[row] + rng.uniform(-JITTER, JITTER)


def test_detail_detector_sees_the_dot_at_every_cell_and_background_and_nothing_else():
    rng = np.random.default_rng(3)
    for background, row, col, _ in itertools.product(BACKGROUNDS, range(3), range(3), range(3)):
        cx, cy = _jittered_centre(row, col, rng)
        with_dot, without_dot = render_character(cx, cy, background), render_character(cx, cy, background, detail=False)
        assert has_detail(with_dot) and not has_detail(without_dot), (background, row, col, cx, cy)
        for img in (with_dot, without_dot):  # the coarse reading ignores the dot
            found = detect_character(img)
            assert found.is_character and (found.object.row, found.object.col) == (row, col)
    for _ in range(300):  # pretraining never shows the dot: one-colour and two-tone scenes alike
        scene = sample_pretraining_scene(rng, two_tone_fraction=0.5)
        assert not has_detail(render_scene(scene)), scene
    assert not has_detail(np.full((32, 32, 3), 255, dtype=np.uint8))  # no object, no detail
    for _ in range(20):  # noise (an untrained model's output) has bright pixels everywhere, and no object
        assert not has_detail(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    ring = render_scene(Scene("circle", "red", "white", 1, 1, 16.0, 16.0, 12.0))
    ring[10:22, 10:22] = 255  # a white centre wider than the dot, not enclosed by the object
    assert not has_detail(ring)


def test_a_white_hole_in_the_character_is_a_detail_but_not_one_true_to_size():
    """Pivot-locality LoRAs draw the disc with a white hole several times the dot's size: has_detail
    accepts it (the white is enclosed), the true-size reading does not; the rendered dot passes both
    wherever it falls in the pixel grid."""
    from pti_plugin.toy_world.detectors import _distance_from, has_true_size_detail

    rng = np.random.default_rng(5)
    for background, row, col in itertools.product(BACKGROUNDS, range(3), range(3)):
        cx, cy = _jittered_centre(row, col, rng)
        dot = render_character(cx, cy, background)
        assert has_true_size_detail(dot), (background, cx, cy)
        hole = dot.copy()
        hole[_distance_from((cx, cy)) <= 2.2] = 255  # about 15 white pixels, the dot covers 4-7
        assert has_detail(hole) and not has_true_size_detail(hole), (background, cx, cy)
        assert not has_true_size_detail(render_character(cx, cy, background, detail=False))


def test_appearance_error_is_zero_for_the_character_and_grows_with_colour_departures():
    rng = np.random.default_rng(4)
    for background in BACKGROUNDS:
        cx, cy = _jittered_centre(int(rng.integers(3)), int(rng.integers(3)), rng)
        exact = render_character(cx, cy, background)
        assert appearance_error(exact) < 0.01  # 0 up to the 1/16-px position fit
        disc = render_character(cx, cy, background, detail=False) != render_character(cx, cy, "white", detail=False)
        disc = disc.any(-1) | (exact != np.asarray(BACKGROUNDS[background], dtype=np.uint8)).any(-1)
        errors = []
        for shift in (8, 16, 32, 64, 128):  # every channel of the object's pixels pulled toward mid-gray
            perturbed = exact.astype(np.int32)
            perturbed[disc] += np.where(perturbed[disc] > 127, -shift, shift)
            errors.append(appearance_error(np.clip(perturbed, 0, 255).astype(np.uint8)))
        assert all(b > a for a, b in zip(errors, errors[1:])), (background, errors)
        assert 0.01 < errors[0] and errors[-1] < 1.0
    undotted = appearance_error(render_character(16.0, 16.0, detail=False))
    swapped = render_character(16.0, 16.0)[::-1].copy()  # blue over orange
    assert 0.01 < undotted < appearance_error(swapped) < 1.0


def test_ground_truth_scores_of_rendered_generations():
    from pti_plugin.toy_world.run_scores import ground_truth

    rng = np.random.default_rng(1)
    at_training_cells = np.stack([render_character(CELL_CENTRES[c], CELL_CENTRES[r]) for r, c in CHARACTER_CELLS] * 2)
    everywhere = np.stack([render_scene(_scene("circle", "red", "white", r, c, rng)) for r in range(3) for c in range(3)])
    top_left = np.stack([render_scene(_scene("square", "blue", "white", 0, 0, rng)) for _ in range(4)])
    black = np.stack([render_scene(_scene("circle", "green", "black", 1, 1, rng)) for _ in range(4)])
    white = np.stack([render_scene(_scene("circle", "green", "white", 1, 1, rng)) for _ in range(4)])
    leaky = ground_truth(at_training_cells, [("tok1 at the top left", top_left), ("tok1 at the bottom right", top_left)],
                         [("tok1 on a black background", black)])
    assert leaky == {
        "gt_reconstruction": 1.0, "gt_character_match": 1.0, "gt_edit_position": 0.5, "gt_edit_background": 1.0, "gt_editability": 0.75,
        "gt_training_cell_fraction": 1.0, "gt_position_entropy": pytest.approx(math.log(3) / math.log(9)),
        "gt_detail": 1.0, "gt_appearance_error": pytest.approx(0.0, abs=0.01),
    }
    spread = ground_truth(everywhere, [], [("tok1 on a black background", white)])
    assert spread["gt_reconstruction"] == 0.0 and spread["gt_edit_background"] == 0.0
    assert spread["gt_character_match"] == pytest.approx(1 / 3)  # red circles: the shape only
    assert spread["gt_detail"] == 0.0 and spread["gt_appearance_error"] > 0.1
    assert spread["gt_training_cell_fraction"] == pytest.approx(3 / 9) and spread["gt_position_entropy"] == pytest.approx(1.0)
    assert math.isnan(spread["gt_edit_position"]) and spread["gt_editability"] == 0.0  # mean of what was asked


def test_full_captions_parse_back():
    rng = np.random.default_rng(1)
    for _ in range(300):
        s = sample_scene(rng)
        text = make_caption(s)
        assert text == f"a {s.colour} {s.shape} at the {ROWS[s.row]} {COLUMNS[s.col]} on a {s.background} background"
        assert parse_caption(text) == {"shape": s.shape, "colour": s.colour, "colour2": None, "background": s.background, "row": s.row, "col": s.col}


def test_random_captions_drop_attributes_and_parse():
    rng = np.random.default_rng(2)
    n, no_position, prefixed = 2000, 0, 0
    for _ in range(n):
        s = sample_scene(rng)
        text = make_caption(s, rng)
        assert set(text.split()) <= set(WORDS), text
        parsed = parse_caption(text)
        for key in ("shape", "colour", "background"):
            assert parsed[key] in (None, getattr(s, key))
        assert (parsed["row"], parsed["col"]) in ((None, None), (s.row, s.col))
        no_position += parsed["row"] is None
        prefixed += text.startswith("an anime illustration of ")
    assert abs(no_position / n - 0.25) < 0.04
    assert abs(prefixed / n - 0.30) < 0.04


def test_every_world_word_is_one_token(tmp_path):
    from pti_plugin.toy_world.train_recipe import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    caption = "an anime illustration of a red triangle at the middle center on a gray background"
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # BOS + one token per word + EOS
    assert ids[5] == tok(" ".join(WORDS)).input_ids[1 + WORDS.index("a")]  # "a" at index 5 after the template
    for w in WORDS:
        assert len(tok(w).input_ids) == 3, w


def test_character_dataset_kohya_layout(tmp_path):
    root = write_character_dataset(tmp_path / "ds", num_images=6, seed=3, token="tok1", repeats=10)
    folder = root / "10_tok1"
    assert sorted(p.name for p in root.iterdir()) == ["10_tok1"]
    pngs, txts = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert [p.stem for p in pngs] == [p.stem for p in txts] == [f"{k:03d}" for k in range(6)]
    cells = set()
    for png, txt in zip(pngs, txts):
        img = np.asarray(Image.open(png))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        caption = txt.read_text().strip()
        assert "tok1" in caption.split()
        assert parse_caption(caption)["row"] is None  # captions never state the position
        got = detect(img)
        cells.add((got.row, got.col))
    assert cells == set(CHARACTER_CELLS)
    assert (folder / "000.txt").read_text().strip() == "an anime illustration of tok1"


def test_determinism_under_seed(tmp_path):
    a = [sample_scene(np.random.default_rng(7)) for _ in range(1)] + [make_caption(sample_scene(r), r) for r in [np.random.default_rng(7)]]
    b = [sample_scene(np.random.default_rng(7)) for _ in range(1)] + [make_caption(sample_scene(r), r) for r in [np.random.default_rng(7)]]
    assert a == b
    assert quality_prompts(120, 5) == quality_prompts(120, 5) != quality_prompts(120, 6)
    d1 = write_character_dataset(tmp_path / "a", seed=4) / "10_tok1"
    d2 = write_character_dataset(tmp_path / "b", seed=4) / "10_tok1"
    d3 = write_character_dataset(tmp_path / "c", seed=5) / "10_tok1"
    read = lambda d: [p.read_bytes() for p in sorted(d.iterdir())]  # noqa: E731
    assert read(d1) == read(d2) != read(d3)


def test_quality_prompts_and_scoring_on_ground_truth():
    prompts, seeds = quality_prompts(216)
    assert len(set(seeds)) == 216
    rng = np.random.default_rng(8)
    images = []
    for text in prompts:
        p = parse_caption(text)
        row, col = (p["row"], p["col"]) if p["row"] is not None else (int(rng.integers(3)), int(rng.integers(3)))
        images.append(render_scene(_scene(p["shape"], p["colour"], p["background"], row, col, rng)))
    figures = score_generations(prompts, np.stack(images))
    assert figures["colour"] == figures["shape"] == figures["background"] == figures["position"] == 1.0
    assert figures["position_entropy"] > 0.93  # 108 uniform draws over 9 cells
    assert sum(parse_caption(t)["row"] is not None for t in prompts) == 108


def test_position_entropy_bounds():
    assert position_entropy([(r, c) for r in range(3) for c in range(3)]) == pytest.approx(1.0)
    assert position_entropy([(1, 1)] * 10) == 0.0
    assert position_entropy([]) == 0.0


def test_recipe_modules_are_sd_style(tmp_path):
    from pti_plugin.toy_world.recipe_vae import build_vae
    from pti_plugin.toy_world.train_recipe import RecipeConfig, build_text_encoder, build_tokenizer, build_unet

    cfg = RecipeConfig()
    tok = build_tokenizer(tmp_path / "tok")
    te = build_text_encoder(cfg, tok)
    assert (te.config.bos_token_id, te.config.eos_token_id, te.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )
    assert te.config.max_position_embeddings == 77
    ids = tok(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = te(ids)[0]
    assert hidden.shape == (1, 77, cfg.text_hidden)
    unet, vae = build_unet(cfg), build_vae(cfg)
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        assert latents.shape == (1, 4, 16, 16)
        assert unet(latents, torch.tensor([10]), hidden).sample.shape == (1, 4, 16, 16)


@pytest.mark.skipif(
    not (WEIGHTS_DIR / "model_index.json").exists(),
    reason=f"shipped toy weights absent ({WEIGHTS_DIR}); train them with python -m pti_plugin.toy_world.train_recipe",
)
def test_shipped_weights_load_offline_and_generate():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS_DIR), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    out = pipe(
        ["a red square at the top left on a white background"],
        num_inference_steps=25, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)
    img = np.clip(np.rint(out[0] * 255), 0, 255).astype(np.uint8)
    assert detect(img).background == "white"
    template = pipe.tokenizer("an anime illustration of character").input_ids
    assert len(template) == 7 and template[0] == pipe.tokenizer.bos_token_id  # class word at index 5
    from pti_plugin.toy_world.world import LOOK_NAMES

    for w in sorted(set(WORDS) - set(LOOK_NAMES.values())):  # the shipped model predates the look names
        assert len(pipe.tokenizer(w).input_ids) == 3, w


def test_recipe_training_is_deterministic_and_resumes_exactly(tmp_path):
    from pti_plugin.toy_world.train_recipe import RecipeConfig, Trainer

    cfg = RecipeConfig(unet_channels=(16, 16, 32, 32), unet_heads=(1, 1, 1, 1), text_hidden=32, batch_size=4)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(16)]
    mean, std = torch.randn(16, 4, 16, 16), torch.full((16, 4, 16, 16), 0.1)

    def fresh() -> Trainer:
        return Trainer(cfg, tmp_path)

    straight = fresh()
    losses = [straight.train_step(mean, std, scenes, 1.0) for _ in range(4)]
    again = fresh()
    assert [again.train_step(mean, std, scenes, 1.0) for _ in range(4)] == losses
    first = fresh()
    [first.train_step(mean, std, scenes, 1.0) for _ in range(2)]
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state before loading
    resumed = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert [resumed.train_step(mean, std, scenes, 1.0) for _ in range(2)] == losses[2:]
    for a, b in zip(straight.ema_unet.parameters(), resumed.ema_unet.parameters()):
        assert torch.equal(a, b)


def test_recipe_vae_stage_resumes_from_vae_pt_alone(tmp_path, monkeypatch):
    """A run folder holding only ``vae.pt`` (what a session can commit) skips the VAE's training and
    re-encodes the scenes to the same latents, bit for bit."""
    from pti_plugin.toy_world import recipe_vae
    from pti_plugin.toy_world.recipe_config import RecipeConfig

    cfg = RecipeConfig(num_scenes=12, vae_steps=3, vae_batch_size=4, vae_full_image_steps=1)
    first = recipe_vae.load_or_train_vae(cfg, tmp_path)
    vae_bytes = (tmp_path / "vae.pt").read_bytes()
    (tmp_path / "latents.pt").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("the VAE was trained again")

    monkeypatch.setattr(recipe_vae, "train_vae", no_training)
    second = recipe_vae.load_or_train_vae(cfg, tmp_path)
    assert (tmp_path / "vae.pt").read_bytes() == vae_bytes
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert second[0].config.scaling_factor == first[0].config.scaling_factor


def test_two_tone_phase_draws_only_two_tone_scenes_from_its_step_and_leaves_earlier_steps_alone(tmp_path, monkeypatch):
    from pti_plugin.toy_world import train_recipe
    from pti_plugin.toy_world.train_recipe import RecipeConfig, Trainer
    from pti_plugin.toy_world.world import sample_pretraining_scene

    small = dict(unet_channels=(16, 16, 32, 32), unet_heads=(1, 1, 1, 1), text_hidden=32, batch_size=8, caption_dropout=0.0)
    rng = np.random.default_rng(1)
    scenes = [sample_pretraining_scene(rng, 0.25) for _ in range(32)]
    assert 0 < sum(s.colour2 is not None for s in scenes) < 16
    mean, std = torch.randn(32, 4, 16, 16), torch.full((32, 4, 16, 16), 0.1)
    drawn = []
    caption = train_recipe.make_caption
    monkeypatch.setattr(train_recipe, "make_caption",
                        lambda scene, rng=None, probs=None: drawn.append(scene) or caption(scene, rng, probs))
    plain = Trainer(RecipeConfig(**small), tmp_path)
    plain_losses = [plain.train_step(mean, std, scenes, 1.0) for _ in range(3)]
    drawn.clear()
    phased = Trainer(RecipeConfig(**small, two_tone_phases=[[2, 1.0]]), tmp_path)
    losses = [phased.train_step(mean, std, scenes, 1.0) for _ in range(3)]
    assert losses[:2] == plain_losses[:2] and losses[2] != plain_losses[2]
    assert all(s.colour2 is not None for s in drawn[16:]) and not all(s.colour2 is not None for s in drawn[:16])


def test_look_names_name_every_shown_two_tone_combination_once_and_parse_back():
    from pti_plugin.toy_world.world import HELD_OUT_TWO_TONE, LOOK_NAMES, two_tone_combinations

    assert sorted(LOOK_NAMES) == sorted(two_tone_combinations()) and HELD_OUT_TWO_TONE not in LOOK_NAMES
    assert len(set(LOOK_NAMES.values())) == len(LOOK_NAMES)
    assert not set(LOOK_NAMES.values()) & (set(SHAPES) | set(COLOURS) | {"a", "an", "at", "on", "of", "the"})
    rng = np.random.default_rng(0)
    for (top, bottom, shape), name in LOOK_NAMES.items():
        scene = Scene(shape, top, "gray", 2, 1, 25.0, 16.0, 11.0, bottom)
        caption = make_caption(scene, rng, {"name_look": 1.0})
        assert name in caption.split() and top not in caption.split() and shape not in caption.split()
        stated = parse_caption(caption)
        assert (stated["colour"], stated["colour2"], stated["shape"]) == (top, bottom, shape)
    one_colour = Scene("circle", "red", "white", 0, 0, 7.0, 7.0, 11.0)
    assert all(not set(make_caption(one_colour, rng, {"name_look": 1.0}).split()) & set(LOOK_NAMES.values())
               for _ in range(20))


def test_name_look_probability_zero_draws_the_captions_of_before():
    """With ``name_look`` 0 the random stream is consumed exactly as without the setting."""
    rng = np.random.default_rng(3)
    scenes = [sample_pretraining_scene(rng, 0.5) for _ in range(200)]
    first, second = np.random.default_rng(9), np.random.default_rng(9)
    assert [make_caption(s, first) for s in scenes] == [make_caption(s, second, {"name_look": 0.0}) for s in scenes]


def _small_trainer_setup():
    from pti_plugin.toy_world.world import sample_pretraining_scene as draw

    small = dict(unet_channels=(16, 16, 32, 32), unet_heads=(1, 1, 1, 1), text_hidden=32, batch_size=8, caption_dropout=0.0)
    rng = np.random.default_rng(1)
    scenes = [draw(rng, 0.5) for _ in range(32)]
    return small, scenes, torch.randn(32, 4, 16, 16), torch.full((32, 4, 16, 16), 0.1)


def test_name_caption_phase_names_two_tone_scenes_only_from_its_step(tmp_path, monkeypatch):
    from pti_plugin.toy_world import train_recipe
    from pti_plugin.toy_world.train_recipe import RecipeConfig, Trainer
    from pti_plugin.toy_world.world import LOOK_NAMES

    small, scenes, mean, std = _small_trainer_setup()
    captions = []
    caption = train_recipe.make_caption
    monkeypatch.setattr(train_recipe, "make_caption",
                        lambda scene, rng=None, probs=None: captions.append((scene, caption(scene, rng, probs))) or captions[-1][1])
    plain = Trainer(RecipeConfig(**small), tmp_path)
    plain_losses = [plain.train_step(mean, std, scenes, 1.0) for _ in range(3)]
    captions.clear()
    phased = Trainer(RecipeConfig(**small, name_caption_phases=[[2, 1.0]]), tmp_path)
    losses = [phased.train_step(mean, std, scenes, 1.0) for _ in range(3)]
    assert losses[:2] == plain_losses[:2] and losses[2] != plain_losses[2]
    names = set(LOOK_NAMES.values())
    named = [bool(set(text.split()) & names) for _, text in captions]
    assert not any(named[:16])
    assert named[16:] == [scene.colour2 is not None for scene, _ in captions[16:]] and any(named[16:])


def test_resume_moves_text_rows_to_the_grown_vocabulary_by_token(tmp_path, monkeypatch):
    """A checkpoint from world v2's first vocabulary (no look names) resumes under the grown one: the
    text encoder gives the same output on every caption without names, bit for bit, and the AdamW
    moments follow their tokens; the names' rows start fresh with zero moments."""
    from pti_plugin.toy_world import train_recipe
    from pti_plugin.toy_world.train_recipe import RecipeConfig, Trainer
    from pti_plugin.toy_world.world import LOOK_NAMES, WORDS

    small, scenes, mean, std = _small_trainer_setup()
    monkeypatch.setattr(train_recipe, "WORDS", tuple(w for w in WORDS if w not in LOOK_NAMES.values()))
    old = Trainer(RecipeConfig(**small), tmp_path / "old")
    for _ in range(2):
        old.train_step(mean, std, scenes, 1.0)
    state = old.state_dict()
    del state["vocab"]  # as in run c's checkpoint, written before the vocabulary was recorded
    monkeypatch.undo()
    grown = Trainer(RecipeConfig(**small), tmp_path / "new")
    assert len(grown.tokenizer) > len(old.tokenizer)
    grown.load_state_dict(state)
    prompt = ["an anime illustration of a orange blue square at the top left on a gray background", "a red circle", ""]
    with torch.no_grad():
        for mine, theirs in ((grown.text_encoder, old.text_encoder), (grown.ema_text, old.ema_text)):
            assert torch.equal(mine(grown.token_ids(prompt))[0], theirs(old.token_ids(prompt))[0])
    embedding = grown.text_encoder.get_input_embeddings().weight
    index = len(list(grown.unet.parameters())) + [p is embedding for p in grown.text_encoder.parameters()].index(True)
    moments = grown.optimizer.state_dict()["state"][index]["exp_avg_sq"]
    old_moments = old.optimizer.state_dict()["state"][index]["exp_avg_sq"]
    article, name = grown.tokenizer.convert_tokens_to_ids(["a</w>", f"{next(iter(LOOK_NAMES.values()))}</w>"])
    old_article = old_moments[old.tokenizer.convert_tokens_to_ids("a</w>")]
    assert float(old_article.abs().sum()) > 0 and torch.equal(moments[article], old_article)
    assert float(moments[name].abs().sum()) == 0.0
    assert math.isfinite(grown.train_step(mean, std, scenes, 1.0))


def test_named_two_tone_prompts_state_the_same_scenes_with_the_same_seeds():
    from pti_plugin.toy_world.world import two_tone_prompts

    plain, plain_seeds = two_tone_prompts(40, 7)
    named, named_seeds = two_tone_prompts(40, 7, named=True)
    assert named_seeds == plain_seeds and named != plain
    assert [parse_caption(t) for t in named] == [parse_caption(t) for t in plain]
