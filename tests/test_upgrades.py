"""Files written by older pti-plugin versions, read by this one (a user upgrades between runs).

Each "old" file is built by hand in the form the named version wrote it (no git history is read), checked against
runs of those versions: resume states, LoRA and embedding files, resolved configs and disk latent caches from the
versions of commits dfac8bd, 3b18ebc, 207b960 and 2b897a4 were read by this version. Everything but one case carried
across unchanged (bit for bit where training did not change); the case that did not: a state saved before a change
of the training rules (SDXL's size ids, kohya's bucket choice, face-box captions) resumed silently under the new
rules. It is now warned about, naming each change that touches the run (``pti_plugin.rule_changes``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.resume import STATE_FILES, read_progress
from pti_plugin.rule_changes import RULES, warn_older_rules

from .conftest import draw_character

#: progress.json as the version of commit 2b897a4 wrote it (the last before the rules changed): no ``lora_scales``,
#: ``batch`` or ``rules``.
FORM_2B897A4 = ("stage_index", "stage_step", "global_step", "stage_kind", "optimizer_type", "param_groups",
                "token_string", "base")

OLDER = "was saved by an older pti-plugin"


def _state(folder: Path, **progress) -> Path:
    """A state folder whose progress.json holds ``progress`` (its other files are not read by these checks)."""
    folder.mkdir(parents=True)
    for name in STATE_FILES:
        (folder / name).write_bytes(b"")
    (folder / "progress.json").write_text(json.dumps({"stage_index": 0, "stage_step": 1, "global_step": 1} | progress))
    return folder


def test_a_state_saved_before_the_bucket_rule_changed_is_warned_about_on_resume(preset, tmp_path, caplog):
    """A bucketed run's state in 2b897a4's form (FORM_2B897A4) resumed: the version that saved it chose other buckets
    for some images; the resume names the bucket change (and no SDXL change: an SD1.5 run). The same state as this
    version writes it, and the old state resumed without buckets (no change touches that run), resume silently."""
    from pti_plugin.trainer import Trainer

    stages = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}]
    raw = preset(stages=stages, resolution=64, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
                 save_every_n_steps=1, save_state=True)
    Trainer(build_config(raw)).run()
    state = Path(raw["output_dir"]) / "pti-state-step00000001"
    assert json.loads((state / "progress.json").read_text())["rules"] == RULES
    old = tmp_path / "old-state"
    shutil.copytree(state, old)
    progress = json.loads((old / "progress.json").read_text())
    (old / "progress.json").write_text(json.dumps({k: progress[k] for k in FORM_2B897A4}))

    def resume(name: str, folder: Path, **overrides) -> str:
        caplog.clear()
        with caplog.at_level("WARNING"):
            Trainer(build_config(raw | {"output_dir": str(tmp_path / name), "resume": str(folder),
                                        "save_every_n_steps": 0, "save_state": False} | overrides)).run()
        return caplog.text

    warned = resume("old", old)
    assert OLDER in warned and "(1) bucket choice is kohya's" in warned and "SDXL" not in warned
    assert "(2) a training image without a caption file in a kohya folder" in warned  # 2_tok1's two uncaptioned images
    assert OLDER not in resume("recorded", state)
    captioned = tmp_path / "captioned"  # every image with a caption file: no change of the rules touches the run
    shutil.copytree(raw["train_data_dir"], captioned)
    for image in (captioned / "2_tok1").glob("*.png"):
        image.with_suffix(".txt").write_text("an anime illustration of tok1")
    assert OLDER not in resume("unbucketed", old, enable_bucket=False, train_data_dir=str(captioned))


def test_an_sdxl_state_from_before_the_size_id_change_is_warned_about(preset, tiny_sdxl, tmp_path, caplog):
    """SDXL's crop_top_left changed after 2b897a4: a state of its form (no lora_scales) on an SDXL model is warned
    about; a state that records lora_scales (written after the change) is not."""
    config = build_config(preset(pretrained_model_name_or_path=str(tiny_sdxl)))
    with caplog.at_level("WARNING"):
        warn_older_rules(read_progress(_state(tmp_path / "old", stage_kind="inversion")), config, [], [], None)
    assert OLDER in caplog.text and "SDXL's size ids" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_older_rules(read_progress(_state(tmp_path / "new", lora_scales={"network_alpha": 4.0, "conv_alpha": None})),
                         config, [], [], None)
    assert caplog.text == ""


def test_face_box_names_and_a_newer_state(preset, tmp_path, caplog):
    """An image named as a face box took no caption from its base name before the change: an old state (no
    lora_scales) of a run with such an image is warned about, one with plain names is not. A state of newer rules than
    this version's (a downgrade) is warned about the other way."""
    config = build_config(preset())
    old = read_progress(_state(tmp_path / "old"))
    with caplog.at_level("WARNING"):
        warn_older_rules(old, config, [], [SimpleNamespace(path=Path("face.png"), is_reg=False, caption_source="file")],
                         None)
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        warn_older_rules(old, config, [], [SimpleNamespace(path=Path("char_40_40_16_16.png"), is_reg=False,
                                                           caption_source="file")], None)
    assert OLDER in caplog.text and "face box" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_older_rules(read_progress(_state(tmp_path / "newer", rules=RULES + 1)), config, [], [], None)
    assert f"saved by a newer pti-plugin (training rules {RULES + 1}; this version's are {RULES})" in caplog.text


def test_a_broken_rules_entry_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'resume': .*progress.json: rules must be a non-negative integer; got '1'"):
        read_progress(_state(tmp_path / "s", rules="1"))


def test_an_sdxl_state_from_before_the_pad_window_change_is_warned_about_where_a_window_changes(
        preset, tiny_sdxl, tmp_path, caplog):
    """SDXL's 150/225-token windows changed after rules 1: a window of a caption that fills them and opens with the
    second tokenizer's pad token '!' now starts BOS EOS (before, the caption's last id, EOS, was taken for the pad, and
    such a window was kept). A rules-1 state (lora_scales, no rules) of a 150-token run is warned about where a training
    caption has such a window (the second window opens at the caption's 76th token), or where a caption whose tags are
    shuffled fills them and holds a '!' (any of its tokens may open a window); a '!' in a caption that does not fill
    them (whose windows the change leaves as they were), or elsewhere in a fixed one, and 75 tokens: no warning."""
    from pti_plugin.data.captions import CaptionOptions
    from pti_plugin.data.dataset import ImageItem
    from pti_plugin.models.loading import load_base_model

    base = load_base_model(str(tiny_sdxl), max_token_length=150)
    model = SimpleNamespace(family=base.family, tokenize_captions=base.tokenize)
    old = read_progress(_state(tmp_path / "old", lora_scales={"network_alpha": 4.0, "conv_alpha": None}))
    long = build_config(preset(pretrained_model_name_or_path=str(tiny_sdxl), max_token_length=150))
    short = build_config(preset(pretrained_model_name_or_path=str(tiny_sdxl)))
    red = lambda n: " ".join(["red"] * n)  # noqa: E731  n tokens

    def warned(config, caption: str, **options) -> bool:
        item = ImageItem(Path("a.png"), caption, (32, 32), 1, False, False, caption_options=CaptionOptions(**options))
        caplog.clear()
        with caplog.at_level("WARNING"):
            warn_older_rules(old, config, [], [item], model)
        return OLDER in caplog.text and "(1) SDXL's 150/225-token windows" in caplog.text

    assert not warned(long, "red, wow!")  # short: padded with the pad id, as before
    assert not warned(long, f"{red(75)} !")  # the second window opens with '!', but the caption does not fill 150
    assert not warned(long, f"{red(10)} ! {red(150)}")  # fills 150; '!' opens no window
    assert warned(long, f"{red(75)} ! {red(80)}")  # fills 150; the second window opens with '!'
    assert warned(long, f"! {red(160)}")  # the first window opens with '!'
    assert warned(long, f"{red(10)}, !, {red(150)}", shuffle_caption=True)  # shuffled, the tag '!' may open one
    assert not warned(short, f"! {red(160)}")  # 75 tokens: one window, unchanged


def test_a_rules_2_state_of_a_folder_run_whose_name_now_captions_its_images_is_warned_about(preset, tmp_path, caplog):
    """Rules 3: a training image without a caption file in a kohya folder whose name contains the token took the
    template; it is captioned with the folder's name now (kohya's class_tokens). A rules-2 state of a run with such
    an image is warned about; one whose uncaptioned image lies in a folder whose name lacks the token (it keeps the
    template), or whose images all have captions, is not."""
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.scanning import scan_images

    old = read_progress(_state(tmp_path / "old", rules=2))
    for name, captions in (("1_tok1 girl", [None, "tok1"]), ("1_girl", [None]), ("1_tok1", ["tok1"])):
        folder = tmp_path / name / name
        folder.mkdir(parents=True)
        for i, caption in enumerate(captions):
            draw_character(folder / f"{i}.png", i)
            if caption:
                (folder / f"{i}.txt").write_text(caption)

    def warned(name: str) -> bool:
        config = build_config(preset(train_data_dir=str(tmp_path / name)))
        subsets = load_subsets(config)
        items = scan_images(config, subsets, log_notes=False)
        caplog.clear()
        with caplog.at_level("WARNING"):
            warn_older_rules(old, config, subsets, items, None)
        return OLDER in caplog.text and "(1) a training image without a caption file in a kohya folder" in caplog.text

    assert warned("1_tok1 girl") and not warned("1_girl") and not warned("1_tok1")


def test_a_rules_3_state_whose_stage_decays_the_pivot_through_optimizer_args_is_warned_about(preset, tmp_path, caplog):
    """Rules 4: a weight_decay in a stage's optimizer_args decays the pivot too (it took pivot_weight_decay alone); a
    rules-3 state of a run whose pivot-training stage has one is warned about, one without is not."""
    old = read_progress(_state(tmp_path / "old", rules=3))
    with caplog.at_level("WARNING"):
        warn_older_rules(old, build_config(preset()), [], [], None)
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        warn_older_rules(old, build_config(preset(optimizer_args=["weight_decay=0.1"])), [], [], None)
    assert OLDER in caplog.text and "decays the pivot too" in caplog.text
