"""Dataset leftovers: kohya folders named by their repeats alone (``10``, ``10_``), and the start-up caption warnings
over the images ``validation_split`` holds out.

kohya (``config_util.generate_dreambooth_subsets_config_by_subdirs``: ``"_".join(name.split("_")[1:])``) gives both
``10`` and ``10_`` the class_tokens ``""``, and ``train_util``'s DreamBooth loader captions their images without a
caption file with it: an empty caption. Here such a folder has no class part: its images without a caption file take
what a folder whose name lacks the token gives them (the template, or caption_prefix/caption_suffix alone), and
the warning says so; its captioned images read their file as in any folder.
"""

from __future__ import annotations

import logging

from pti_plugin.config_loading import build_config
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.scanning import scan_images_and_held_out
from pti_plugin.dataset_preview import preview_dataset

from .test_kohya_folders_s38 import TEMPLATE, _folder  # TEMPLATE: caption_template's default with the token

REG_TEMPLATE = "an anime illustration of character"  # ... with init_word's default, for reg images
NO_CLASS = "as the folder's name has no class part after its repeats (kohya would give them an empty caption)"
HELD = "held out for the validation loss by validation_split"


def _scan(caplog, **raw):
    config = build_config({"resolution": 32} | raw)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        subsets = load_subsets(config)
        train, held = scan_images_and_held_out(config, subsets)
    return subsets, train, held, [r.getMessage() for r in caplog.records]


def _rows(items) -> list[tuple[str, str, str, str]]:
    return [(i.subset_name, i.path.name, i.caption, i.caption_source) for i in items]


def test_folders_named_by_their_repeats_alone_have_no_class_part(tmp_path, caplog):
    """``10`` and ``3_`` (training), ``2`` and ``2_`` (reg): no class_tokens. A caption file is read as anywhere; an
    uncaptioned training image takes the template (the warning named no reason; it names kohya's empty caption), or
    caption_prefix alone where it names the token; an uncaptioned reg image the template with the class word. In a
    dataset_config, class_tokens = "" is none."""
    _folder(tmp_path / "train" / "10", [None, "tok1, smile"])
    _folder(tmp_path / "train" / "3_", [None, "tok1, a cat"])
    _folder(tmp_path / "reg" / "2", [None, "1girl"])
    _folder(tmp_path / "reg" / "2_", [None])
    subsets, train, _, logged = _scan(caplog, train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"))
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens) for s in subsets] == [
        ("10", 10, None), ("3_", 3, None), ("2", 2, None), ("2_", 2, None)]
    assert [row[:3] for row in _rows(train)] == [
        ("10", "0.png", TEMPLATE), ("10", "1.png", "tok1, smile"), ("3_", "0.png", TEMPLATE),
        ("3_", "1.png", "tok1, a cat"), ("2", "0.png", REG_TEMPLATE), ("2", "1.png", "1girl"),
        ("2_", "0.png", REG_TEMPLATE)]
    warned = [m for m in logged if "have no caption file" in m]
    assert len(warned) == 1 and warned[0].startswith("2 training image(s) have no caption file (10/0.png, 3_/0.png): ")
    assert f"the 1 of 10 take caption_template {TEMPLATE!r}, {NO_CLASS}; the 1 of 3_ take caption_template " \
           f"{TEMPLATE!r}, {NO_CLASS}." in warned[0]

    _folder(tmp_path / "prefixed" / "5_", [None])
    _, train, _, logged = _scan(caplog, train_data_dir=str(tmp_path / "prefixed"), caption_prefix="tok1")
    assert train[0].caption_lines == ("",) and train[0].caption_source == "affixes"
    assert "the 1 of 5_ take caption_prefix/caption_suffix alone" in " ".join(logged)

    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'train' / '3_'}'\nclass_tokens = ''\n")
    subsets, train, _, logged = _scan(caplog, dataset_config=str(toml))
    assert subsets[0].class_tokens in ("", None) and _rows(train)[0] == ("3_", "0.png", TEMPLATE, "template")


def test_caption_warnings_count_the_images_validation_split_holds_out(tmp_path, caplog):
    """``1_mychar``: 4 images without a caption file, 2 held out (round(4 x 0.5)); ``1_cat``: 2 captions without the
    token, 1 held out. Both warnings counted the training images only (2 and 1); they count every image the run
    reads and say how many are held out, in the scan's log and in the dataset preview."""
    _folder(tmp_path / "train" / "1_mychar", [None] * 4)
    _folder(tmp_path / "train" / "1_cat", ["a cat", "a cat"])
    _, train, held, logged = _scan(caplog, train_data_dir=str(tmp_path / "train"), validation_split=0.5)
    assert len(train) == 3 and len(held) == 3
    uncaptioned = [m for m in logged if "have no caption file" in m]
    assert len(uncaptioned) == 1 and uncaptioned[0].startswith(
        f"4 training image(s) (2 of them {HELD}) have no caption file (1_mychar/0.png, 1_mychar/1.png, "
        "1_mychar/2.png, 1_mychar/3.png): the 4 of 1_mychar take caption_template")
    assert [m for m in logged if "did not contain" in m][0].startswith(
        f"2 caption(s) did not contain 'tok1' (1 of them {HELD}); it was prepended to them")
    preview = preview_dataset(build_config({"resolution": 32, "train_data_dir": str(tmp_path / "train"),
                                            "validation_split": 0.5}), n=0)
    assert any(note.startswith(f"4 training image(s) (2 of them {HELD})") for note in preview.notes)
    assert any(note.startswith(f"2 caption(s) did not contain 'tok1' (1 of them {HELD})") for note in preview.notes)
