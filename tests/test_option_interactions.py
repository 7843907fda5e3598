"""kohya training options in combination: warm-up vs scheduler and stage length, noise and sampling limits,
logging_dir alone. Each bad combination is refused at start naming its key (exit 2, nothing written) instead of
being ignored silently or failing with a traceback once training had run. sample_prompts in kohya's .toml / .json
formats (read as kohya's load_prompts reads them, not line by line); alpha masks cut with kohya's face crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.data.augment import draw_augmentation
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.masks import pixels_and_mask
from pti_plugin.data.scanning import scan_images
from pti_plugin.resolution import with_epoch_steps
from pti_plugin.sampling import SamplePrompt, read_prompt_file
from pti_plugin.trainer import Trainer

from .test_reliability import _assert_clean, _cli, _output_state


@pytest.fixture
def short(preset, tmp_path):
    """A one-step inversion run; the output folder holds an earlier run's file that must survive."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier-run.safetensors").write_bytes(b"earlier")
    return lambda **overrides: preset(**({"stages": [{"kind": "inversion", "steps": 1}]} | overrides))


def _prompts(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(text + "\n")
    return str(path)


CASES = {
    # before: accepted, and the stage's warm-up was -1
    "negative stage warm-up": (lambda t: {"stages": [{"kind": "inversion", "steps": 1, "lr_warmup_steps": -1}]},
                               [], "key 'stages.0.lr_warmup_steps' must be >= 0"),
    # before: the constant scheduler ignored the warm-up silently (kohya refuses it)
    "warm-up on the constant scheduler": (lambda t: {}, ["--lr_warmup_steps", "5"],
                                          "--lr_warmup_steps (command line) = 5 reaches stage 0"),
    # kohya's ratio form takes floats below 1 only
    "warm-up ratio of 1.5": (lambda t: {"lr_scheduler": "linear"}, ["--lr_warmup_steps", "1.5"],
                             "--lr_warmup_steps (command line) as a float is a fraction"),
    # before: discount 2 trained on noise drowned in its coarse levels, 1e30 on NaN noise (exit 3)
    "pyramid noise discount above 1": (lambda t: {"multires_noise_iterations": 6}, ["--multires_noise_discount", "2"],
                                       "--multires_noise_discount (command line) must be between 0 and 1"),
    # before: a traceback when the stage began (diffusers: lr_end 1e-7 must be smaller than the initial lr)
    "polynomial below its end rate": (lambda t: {"lr_scheduler": "polynomial",
                                                 "stages": [{"kind": "inversion", "steps": 1, "learning_rate": 1e-8}]},
                                      [], "preset: key 'lr_scheduler': stage 0 'inversion0': lr_scheduler 'polynomial'"),
    # before: a traceback at the first sample, after training
    "sample prompt --s beyond the timesteps": (lambda t: {"sample_prompts": _prompts(t, "tok1 --w 32 --h 32 --s 1001")},
                                               [], "line 1: --s must be between 1 and 1000"),
    "sample_steps beyond the timesteps": (lambda t: {"sample_prompts": _prompts(t, "tok1 --w 32 --h 32")},
                                          ["--sample_steps", "5000"], "--sample_steps (command line) must be at most 1000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_option_combination_is_refused_at_start_naming_the_key(case, short, tmp_path, capsys):
    overrides, extra, expected = CASES[case]
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(**overrides(tmp_path)), tmp_path, capsys, extra)
    assert code == 2, seen
    assert expected in seen, seen
    assert "Traceback" not in seen
    _assert_clean(out, before)
    assert not (out / "pti.config.toml").exists() and not (out / "pti.log.jsonl").exists()


def test_a_float_warmup_below_one_is_kohyas_fraction_of_each_stages_steps(preset):
    config = build_config(preset(lr_scheduler="linear", lr_warmup_steps=0.5, stages=[
        {"kind": "inversion", "steps": 4}, {"kind": "lora", "steps": 3, "lr_warmup_steps": 0.34},
        {"kind": "lora", "max_train_epochs": 2}]))
    assert [s.lr_warmup_steps for s in config.stages[:2]] == [2, 1]  # int(0.5 * 4), int(0.34 * 3) as kohya
    assert with_epoch_steps(config, 3).stages[2].lr_warmup_steps == 3  # int(0.5 * 2 epochs x 3 steps)


def test_a_warmup_longer_than_its_stage_is_said(preset, caplog):
    config = build_config(preset(lr_scheduler="constant_with_warmup", lr_warmup_steps=10,
                                 stages=[{"kind": "inversion", "steps": 4}]))
    with_epoch_steps(config, 1)
    assert "stage 0 'inversion0': lr_warmup_steps = 10 is not below its 4 steps" in caplog.text


def test_logging_dir_alone_logs_to_tensorboard_as_kohya_does(preset, tmp_path):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "tb"
    config = build_config(preset(logging_dir=str(logs), stages=[{"kind": "inversion", "steps": 1}]))
    assert config.log_with == "tensorboard"
    Trainer(config).run()
    assert list(logs.rglob("events.out.tfevents.*"))  # before: nothing was logged, and nothing said so


# ----------------------------------------------------------------------------- sample prompt files (kohya's formats)


#: kohya's .toml prompt file (``train_util.load_prompts``): the [prompt] table's keys are every subset's defaults.
KOHYA_PROMPTS_TOML = """
[prompt]
width = 32
height = 32
sample_steps = 2
negative_prompt = "lowres"

[[prompt.subset]]
prompt = "tok1 smiling"
seed = 7

[[prompt.subset]]
prompt = "tok1 in the snow"
scale = 5.5
sample_sampler = "euler_a"
height = 48
"""


def test_a_kohya_toml_or_json_prompt_file_is_read_as_kohya_reads_it(tmp_path):
    toml_file = tmp_path / "prompts.toml"
    toml_file.write_text(KOHYA_PROMPTS_TOML)
    # before: each of the file's 12 non-blank lines was a prompt ("[prompt]", "width = 32", ...)
    assert read_prompt_file(toml_file) == [
        SamplePrompt("tok1 smiling", negative="lowres", width=32, height=32, steps=2, seed=7),
        SamplePrompt("tok1 in the snow", negative="lowres", width=32, height=48, steps=2, guidance=5.5,
                     sampler="euler_a")]
    json_file = tmp_path / "prompts.json"
    json_file.write_text('[{"prompt": "tok1 smiling", "width": 32, "height": 32, "scale": 4},'
                         ' "tok1 in the snow --w 48 --h 32 --d 3"]')
    assert read_prompt_file(json_file) == [SamplePrompt("tok1 smiling", width=32, height=32, guidance=4.0),
                                           SamplePrompt("tok1 in the snow", width=48, height=32, seed=3)]


def test_a_run_samples_each_prompt_of_a_toml_prompt_file_once(preset, tmp_path):
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(KOHYA_PROMPTS_TOML)
    Trainer(build_config(preset(sample_prompts=str(prompts), stages=[{"kind": "inversion", "steps": 1}]))).run()
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == ["pti-final-0.png", "pti-final-1.png"]


PROMPT_FILE_CASES = {
    "a key kohya's SD sampling does not read": ("prompts.toml", '[prompt]\n[[prompt.subset]]\nprompt = "tok1"\n'
                                                "guidance_scale = 3.5\n", "prompt 1: key 'guidance_scale' unknown"),
    "a size no sample can take": ("prompts.toml", '[prompt]\nwidth = -30\n[[prompt.subset]]\nprompt = "tok1"\n',
                                  "prompt 1: width must not be negative, got -30"),
    "a .toml file without kohya's tables": ("prompts.toml", 'prompt = "tok1"\n', "is not in kohya's .toml prompt format"),
    "a number as text": ("prompts.json", '[{"prompt": "tok1", "sample_steps": "20"}]',
                         "prompt 1: key 'sample_steps' expects int, got '20'"),
    "an unknown sampler": ("prompts.json", '["tok1 --w 32 --h 32", {"prompt": "tok1", "sample_sampler": "plms2"}]',
                           "prompt 2: unknown sampler 'plms2'"),
}


@pytest.mark.parametrize("case", sorted(PROMPT_FILE_CASES))
def test_a_bad_toml_or_json_prompt_file_is_refused_at_start_naming_the_prompt(case, short, tmp_path, capsys):
    """Before: such a file was read line by line; each line a prompt, nothing refused."""
    name, text, expected = PROMPT_FILE_CASES[case]
    (tmp_path / name).write_text(text)
    code, seen = _cli(short(sample_prompts=str(tmp_path / name)), tmp_path, capsys)
    assert code == 2, seen
    assert f"sample_prompts': {tmp_path / name} {expected}" in seen, seen
    assert "Traceback" not in seen


# ----------------------------------------------------------------------------- face crops with loss masks

def _face_with_alpha(path: Path) -> None:
    """200x160 grey noise, a face-coloured square at (100, 50)-(140, 90), the alpha 255 there and 0 elsewhere."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(90, 160, (160, 200, 3), dtype=np.uint8))
    ImageDraw.Draw(image).rectangle([100, 50, 139, 89], fill=(250, 10, 10))
    alpha = Image.new("L", (200, 160), 0)
    ImageDraw.Draw(alpha).rectangle([100, 50, 139, 89], fill=255)
    image.putalpha(alpha)
    image.save(path)


def _face_item(tmp_path: Path, **raw):
    folder = tmp_path / "data" / "1_tok1"
    folder.mkdir(parents=True)
    _face_with_alpha(folder / "img_120_70_40_40.png")  # the face box kohya reads from the name: centre (120, 70), 40 px
    config = build_config({"train_data_dir": str(tmp_path / "data"), "resolution": 64, "alpha_mask": True} | raw)
    (item,) = scan_images(config, load_subsets(config))
    return item


def test_an_alpha_mask_follows_a_fixed_face_crop_as_kohya_crops_the_rgba_image(tmp_path):
    """kohya crops the RGBA image around the face, so its alpha mask is cut with it; before: refused."""
    item = _face_item(tmp_path, face_crop_aug_range=[2.0, 2.0])
    _, mask = pixels_and_mask(item, draw_augmentation(item, torch.Generator().manual_seed(0)))
    # kohya's rule: the crop's side (64) is 2 faces (40 px) -> scale 0.8: 200x160 -> 160x128, the 64x64 crop centred
    # on the face at (96, 56): (64, 24)-(128, 88). The alpha resized and cut there, as the image is:
    alpha = Image.open(item.path).getchannel("A").resize((160, 128), Image.Resampling.LANCZOS).crop((64, 24, 128, 88))
    assert torch.equal(mask, torch.from_numpy(np.asarray(alpha, dtype=np.uint8).copy()).float() / 255.0)
    assert mask[17:47, 17:47].min() > 0.99 and mask[:14].max() < 0.01 and mask[:, 50:].max() < 0.01  # the face


def test_an_alpha_mask_follows_random_face_crops_and_flips(tmp_path):
    item = _face_item(tmp_path, face_crop_aug_range=[1.5, 3.0], random_crop=True, flip_aug=True)
    boxes = set()
    for seed in range(12):
        pixels, mask = pixels_and_mask(item, draw_augmentation(item, torch.Generator().manual_seed(seed)))
        face = ((pixels[0] > 0.6) & (pixels[1] < -0.5)).numpy()  # the face-coloured pixels
        ys, xs = np.nonzero(mask.numpy() > 0.5)
        fy, fx = np.nonzero(face)
        assert len(xs) == 0 if len(fx) == 0 else len(xs) > 0  # random_crop may cut the face out: then the mask too
        if len(fx) == 0:
            continue
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        assert abs(box[0] - fx.min()) <= 1 and abs(box[1] - fy.min()) <= 1
        assert abs(box[2] - fx.max()) <= 1 and abs(box[3] - fy.max()) <= 1, (seed, box)
        boxes.add(box)
    assert len(boxes) > 3  # the crops differ from draw to draw, and the mask moves with each


def test_a_cached_fixed_face_crop_with_an_alpha_mask_trains_as_without_the_cache(preset, tmp_path):
    (tmp_path / "data" / "1_tok1").mkdir(parents=True)
    _face_with_alpha(tmp_path / "data" / "1_tok1" / "img_120_70_40_40.png")
    lora = {}
    for name, cache in (("plain", {}), ("cached", {"cache_latents_to_disk": True})):
        raw = preset(train_data_dir=str(tmp_path / "data"), resolution=64, train_batch_size=1, alpha_mask=True,
                     face_crop_aug_range=[2.0, 2.0], output_dir=str(tmp_path / name),
                     stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}], **cache)
        Trainer(build_config(raw)).run()
        lora[name] = load_file(tmp_path / name / "tok1.safetensors")["emb_params"]
    assert torch.equal(lora["plain"], lora["cached"])
