"""SDXL as a kohya ``sdxl_train_network.py`` user trains it: the size ids each sample carries, ``clip_skip`` and
``max_token_length`` 150/225.

The expected size ids are worked out here by hand from kohya's rule (``library/train_util.py``:
``BucketManager.get_crop_ltrb`` and ``BaseDataset.__getitem__``): ``original_size`` (h, w) is the image file's,
``target_size`` (h, w) the bucket's, and ``crop_top_left`` (top, left) the margins, rounded down, of the image
fitted *inside* the bucket and centred there (fitted size: the bucket's height times the image's aspect when the
bucket is wider than the image, else the bucket's width over it); a flipped sample's left is the bucket width less
the fitted image's right edge; ``random_crop`` does not move them. For example a 100 x 60 image (w x h) in a 64 x 64
bucket fits as 64 x 38.4: top (64 - 38.4) // 2 = 12, left 0.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import Trainer


@register_plugin
class SizeIds(Plugin):
    """Every sample's size ids as the batch carries them: image file name -> set of (6 ints)."""

    name = "test_sdxl_r4_size_ids"
    seen: dict = defaultdict(set)

    def on_step_start(self, state, batch):
        for path, row in zip(batch.image_paths, batch.sizes.tolist()):
            SizeIds.seen[Path(path).name].add(tuple(int(x) for x in row))


def _images(root: Path, sizes: list[tuple[int, int]]) -> Path:
    folder = root / "data" / "1_tok1"
    folder.mkdir(parents=True, exist_ok=True)
    for w, h in sizes:
        Image.new("RGB", (w, h), (200, w % 256, h % 256)).save(folder / f"{w}x{h}.png")
    return root / "data"


def _run(tmp_path: Path, tiny_sdxl: Path, sizes: list[tuple[int, int]], steps: int = 12, **keys) -> dict:
    """The size ids seen in a run of ``steps`` inversion steps (buckets at 64 px, steps of 32, 32 to 128 px)."""
    SizeIds.seen = defaultdict(set)
    raw = dict(pretrained_model_name_or_path=str(tiny_sdxl), train_data_dir=str(_images(tmp_path, sizes)),
               resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
               output_dir=str(tmp_path / "out"), overwrite=True, train_batch_size=2, network_dim=4, network_alpha=4.0,
               plugins={SizeIds.name: {}}, stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 1e-3,
                                                     "steps": steps}])
    Trainer(build_config(raw | keys)).run()
    return dict(SizeIds.seen)


#: kohya's ids of each image in its bucket, by hand (see the module docstring); a set: unflipped, flipped.
BUCKETED = {
    "100x60.png": {(60, 100, 12, 0, 64, 64)},  # 64 x 64 bucket: fitted 64 x 38.4, top 12; flipped: 64 - 64 = 0
    # 64 x 64 bucket: fitted 52.46 x 64, left 11.54 // 2 = 5; flipped 64 - (5 + 52.46) = 6.54 -> 6
    "50x61.png": {(61, 50, 0, 5, 64, 64), (61, 50, 0, 6, 64, 64)},
    "60x100.png": {(100, 60, 21, 0, 96, 32)},  # 32 x 96 bucket: fitted 32 x 53.33, top 42.67 // 2 = 21
}


def test_bucketed_size_ids_are_kohyas_with_flip_and_random_crop(tmp_path, tiny_sdxl):
    """Before: the ids were the bucket window's offset in the resized image ((0, 21) for 100 x 60) and followed the
    random crop; kohya's are the fitted image's margins, mirrored by a flip, whatever the crop."""
    seen = _run(tmp_path, tiny_sdxl, [(100, 60), (50, 61), (60, 100)], flip_aug=True, random_crop=True)
    assert seen == BUCKETED


def test_size_ids_of_cached_latents_and_bucket_no_upscale_survive_a_disk_cache_reload(tmp_path, tiny_sdxl):
    """bucket_no_upscale: 100 x 60 scales down to 64 x 38 (kohya's rounding), bucket 64 x 32, fitted 53.33 x 32: left
    5, flipped 64 - 58.33 -> 5; 50 x 61 is not scaled, bucket 32 x 32, fitted 26.23 x 32: left 2, flipped 3. A second
    run reads the latents back from disk and carries the same ids."""
    expected = {"100x60.png": {(60, 100, 0, 5, 32, 64)}, "50x61.png": {(61, 50, 0, 2, 32, 32), (61, 50, 0, 3, 32, 32)}}
    keys = dict(flip_aug=True, bucket_no_upscale=True, cache_latents_to_disk=True)
    first = _run(tmp_path, tiny_sdxl, [(100, 60), (50, 61)], **keys)
    assert first == expected
    folder = tmp_path / "data" / "1_tok1"
    cached = {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".safetensors"}
    assert len(cached) == 4  # each image and its flip
    second = _run(tmp_path, tiny_sdxl, [], **keys)  # the same folder: the latents are read back
    assert {p: p.stat().st_mtime_ns for p in cached} == cached  # not rewritten
    assert second == expected


def test_held_out_images_are_validated_with_kohyas_unflipped_ids(tmp_path, tiny_sdxl, monkeypatch):
    """Validation takes each held-out image unaugmented: kohya's ids without the flip (60 x 100 in its 32 x 96 bucket:
    top 21, left 0; 100 x 60 in 64 x 64: top 12)."""
    import pti_plugin.validation as validation

    used = []

    def recording(image_size, bucket, *args):
        ids = validation_size_conditioning(image_size, bucket, *args)
        used.append((tuple(image_size), ids))
        return ids

    validation_size_conditioning = validation.size_conditioning
    monkeypatch.setattr(validation, "size_conditioning", recording)
    _run(tmp_path, tiny_sdxl, [(100, 60), (60, 100), (50, 61), (61, 50)], steps=2, validation_split=0.5,
         validate_every_n_steps=1)
    by_size = {(100, 60): (60, 100, 12, 0, 64, 64), (60, 100): (100, 60, 21, 0, 96, 32),
               (50, 61): (61, 50, 0, 5, 64, 64), (61, 50): (50, 61, 5, 0, 64, 64)}
    assert used and all(ids == by_size[size] for size, ids in used)


def test_clip_skip_is_ignored_for_sdxl_with_a_warning_as_kohya(tmp_path, tiny_sdxl, preset, caplog):
    """kohya's sdxl_train_util warns that clip_skip does nothing for SDXL and trains; it was refused here. The run
    with clip_skip = 2 trains exactly as the run without it."""
    outputs = {}
    for skip in (1, 2):
        raw = preset(pretrained_model_name_or_path=str(tiny_sdxl), clip_skip=skip,
                     output_dir=str(tmp_path / f"out{skip}"))
        with caplog.at_level(logging.WARNING):
            outputs[skip] = Trainer(build_config(raw)).run()
    assert "clip_skip = 2 is ignored for SDXL, as kohya ignores it" in caplog.text
    for key in ("lora", "embedding"):
        one, two = load_file(outputs[1][key]), load_file(outputs[2][key])
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("size, bucket, flip, expected", [
    ((48, 32), (32, 32), False, (32, 48, 5, 0, 32, 32)),  # fitted 32 x 21.33: top 10.67 // 2 = 5
    ((1000, 800), (1024, 832), False, (800, 1000, 6, 0, 832, 1024)),  # fitted 1024 x 819.2: top 6
    ((1000, 800), (1024, 832), True, (800, 1000, 6, 0, 832, 1024)),  # flipped: 1024 - (0 + 1024) = 0
    ((832, 1216), (832, 1216), True, (1216, 832, 0, 0, 1216, 832)),  # the bucket's own size: no margins
    ((0, 0), (64, 64), False, (64, 64, 0, 0, 64, 64)),  # size unknown: the bucket's
])
def test_size_conditioning_by_hand(size, bucket, flip, expected):
    from pti_plugin.data.buckets import size_conditioning

    assert size_conditioning(size, bucket, flip) == expected


def _kohya_windows(ids: list[int], eos: int, pad: int) -> list[list[int]]:
    """kohya's ``strategy_base._get_input_ids`` for a caption longer than 77 ids, written out: BOS, 75 ids, the last
    id; a window whose 75th id is neither EOS nor padding ends with EOS; one that starts with padding, BOS EOS."""
    windows = []
    for start in range(1, len(ids) - 2, 75):
        chunk = [ids[0]] + ids[start : start + 75] + [ids[-1]]
        if chunk[-2] not in (eos, pad):
            chunk[-1] = eos
        if chunk[1] == pad:
            chunk[1] = eos
        windows.append(chunk)
    return windows


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_long_captions_are_encoded_in_kohyas_sdxl_windows(tiny_sdxl, max_token_length):
    """kohya's ``strategy_sdxl``: each encoder's windows encoded, the penultimate states stitched (the first window's
    BOS row, rows 1-75 of every window, the last window's row 76), the pooled output the first window's at its first
    EOS. Captions of 125 and 250 tokens (the second cut at max_token_length) and a short one (later windows empty)."""
    from pti_plugin.models.loading import load_base_model

    base = load_base_model(str(tiny_sdxl), max_token_length=max_token_length)
    captions = [", ".join(["an anime illustration of tok1"] * 14), ", ".join(["an anime illustration of tok1"] * 28),
                "tok1, red"]
    te1, te2 = base.text_encoders
    with torch.no_grad():
        ours = base.encode(base.tokenize(captions))
        for row, caption in enumerate(captions):
            parts, pooled = [], None
            for tok, te in zip(base.tokenizers, (te1, te2)):
                ids = tok(caption, padding="max_length", max_length=max_token_length + 2, truncation=True).input_ids
                windows = _kohya_windows(ids, tok.eos_token_id, tok.pad_token_id)
                states = [te(torch.tensor([w]), output_hidden_states=True) for w in windows]
                rows = [states[0].hidden_states[-2][0, :1]] + [s.hidden_states[-2][0, 1:76] for s in states]
                parts.append(torch.cat(rows + [states[-1].hidden_states[-2][0, 76:]]))
                if te is te2:
                    pooled = te2.text_projection(states[0].last_hidden_state[0, windows[0].index(tok.eos_token_id)])
            assert ours.hidden_states.shape[1] == max_token_length + 2
            torch.testing.assert_close(ours.hidden_states[row], torch.cat(parts, dim=-1), rtol=0, atol=1e-6)
            torch.testing.assert_close(ours.added_cond_kwargs["text_embeds"][row], pooled, rtol=0, atol=1e-6)


def test_sdxl_trains_with_max_token_length_225_and_weighted_captions(tiny_sdxl, preset):
    """Refused before ('150/225 windows are SD1.5 only'); kohya's sdxl_train_network takes it."""
    from safetensors import safe_open

    outputs = Trainer(build_config(preset(pretrained_model_name_or_path=str(tiny_sdxl), max_token_length=225,
                                          weighted_captions=True, cache_text_encoder_outputs=True))).run()
    with safe_open(str(outputs["lora"]), "pt") as lora:
        assert lora.metadata()["ss_max_token_length"] == "225"


def test_a_centre_file_measured_on_sdxl_fits_a_run_whose_ignored_clip_skip_is_2(tmp_path):
    """SDXL ignores clip_skip (the family applies 1): the ellipsoid check records 1, so a pivot-locality run with
    clip_skip = 2 must compare the file with the 1 its conditioning applies, not with the config's 2."""
    import contextlib
    from types import SimpleNamespace

    from pti_plugin.centre_file import save_centre_file
    from pti_plugin.hooks import TrainerState
    from pti_plugin.models.sdxl import SDXLFamily
    from pti_plugin.plugins.locality_centre import load_centre

    path = save_centre_file(tmp_path / "centre.safetensors", torch.zeros(77, 8), torch.ones(8), torch.zeros(8),
                            {"clip_skip": 1})
    stub = SimpleNamespace(model=SimpleNamespace(family=SDXLFamily(clip_skip=2)), config=SimpleNamespace(clip_skip=2),
                           device="cpu", frozen=contextlib.nullcontext,
                           encode=lambda ids, lora: SimpleNamespace(hidden_states=torch.zeros(1, 77, 8)))
    stub.clip_skip = TrainerState.clip_skip.fget(stub)
    centre = load_centre(stub, str(path), torch.zeros(1, 2, 77, dtype=torch.long), None).centre
    assert centre.shape == (77, 8)
