"""kohya folder datasets as a kohya user lays them out: the folder name of images without a caption file, the user's
own trigger word in the captions, and the count in "no usable training image".

kohya (``config_util.generate_dreambooth_subsets_config_by_subdirs``) sets every ``<repeats>_<name>`` folder's
``class_tokens`` to ``<name>``, for training and reg folders alike, and an image without a caption file is captioned
with it (``train_util``: "No caption file found for N images"). Here a training folder's name is used where it names
the token string once; else its images take the template, and one warning says which.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.scanning import scan_images
from pti_plugin.dataset_preview import preview_dataset

TEMPLATE = "an anime illustration of tok1"


def _folder(path: Path, captions: list[str | None]) -> Path:
    """Images ``0.png``... in ``path``, each with a ``.txt`` caption where ``captions`` gives one (None: no file)."""
    path.mkdir(parents=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(path / f"{i}.png")
        if caption is not None:
            (path / f"{i}.txt").write_text(caption)
    return path


def _scan(caplog, **raw) -> tuple[list, list]:
    config = build_config({"resolution": 32} | raw)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        subsets = load_subsets(config)
        return subsets, scan_images(config, subsets)


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_training_folders_name_captions_its_images_without_a_caption_file_as_kohya(tmp_path, caplog):
    """``10_tok1 1girl`` (two images without captions): "tok1 1girl", as kohya; ``10_mychar`` (its name lacks tok1):
    the template, said in the warning with kohya's caption; the reg folder keeps its name. One warning counts the 3
    training images without a caption file and names them; none for the reg images."""
    _folder(tmp_path / "train" / "10_tok1 1girl", [None, "tok1, smile", None])
    _folder(tmp_path / "train" / "10_mychar", [None])
    _folder(tmp_path / "reg" / "1_1girl", [None, None])
    subsets, items = _scan(caplog, train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"))
    assert [(s.image_dir.name, s.class_tokens) for s in subsets] == [
        ("10_mychar", None), ("10_tok1 1girl", "tok1 1girl"), ("1_1girl", "1girl")]
    assert [(i.subset_name, i.path.name, i.caption) for i in items] == [
        ("10_mychar", "0.png", TEMPLATE), ("10_tok1 1girl", "0.png", "tok1 1girl"),
        ("10_tok1 1girl", "1.png", "tok1, smile"), ("10_tok1 1girl", "2.png", "tok1 1girl"),
        ("1_1girl", "0.png", "1girl"), ("1_1girl", "1.png", "1girl")]
    warned = _warnings(caplog, "have no caption file")
    assert len(warned) == 1
    assert warned[0].startswith("3 training image(s) have no caption file (10_mychar/0.png, 10_tok1 1girl/0.png, "
                                "10_tok1 1girl/2.png): ")
    assert (f"the 1 of 10_mychar take caption_template {TEMPLATE!r}, as the folder's name 'mychar' does not contain "
            "'tok1' (kohya would caption them 'mychar')") in warned[0]
    assert "the 2 of 10_tok1 1girl take their folder's name 'tok1 1girl' (kohya's class_tokens)" in warned[0]
    assert "name the folder <repeats>_<caption naming 'tok1'>" in warned[0] and "1_1girl" not in warned[0]


def test_a_folder_name_without_the_token_is_used_where_caption_prefix_names_it(tmp_path, caplog):
    """kohya captions them ``caption_prefix + " " + name``: with caption_prefix = "tok1" the name of ``10_mychar``
    is their caption (prefixed when drawn), where they took the prefix alone."""
    _folder(tmp_path / "train" / "10_mychar", [None])
    subsets, items = _scan(caplog, train_data_dir=str(tmp_path / "train"), caption_prefix="tok1")
    assert subsets[0].class_tokens == "mychar" and [i.caption for i in items] == ["mychar"]
    assert "the 1 of 10_mychar take their folder's name 'mychar'" in caplog.text


def test_captions_under_another_extension_name_the_caption_the_images_get(tmp_path, caplog):
    """The warning said "captions come from class_tokens or caption_template" for a folder that sets neither: it now
    names the folder's name, which is what they are captioned with."""
    _folder(tmp_path / "train" / "2_tok1 girl", [None, None])
    for name in ("0", "1"):
        (tmp_path / "train" / "2_tok1 girl" / f"{name}.caption").write_text("tok1, red hair")
    _scan(caplog, train_data_dir=str(tmp_path / "train"))
    warned = _warnings(caplog, "no .txt caption file beside")
    assert len(warned) == 1 and "class_tokens or caption_template" not in warned[0]
    assert "(here: the folder name 'tok1 girl'); set caption_extension = '.caption'" in warned[0]


def test_captions_missing_the_token_that_share_a_first_tag_suggest_it_as_token_string(tmp_path, caplog):
    """``10_mychar`` captioned "mychar, 1girl, ...": the note suggests ``--token_string mychar``; with it the captions
    hold the token (nothing prepended, no note) and the folder's name captions its uncaptioned image."""
    _folder(tmp_path / "train" / "10_mychar", ["mychar, 1girl, smile", "mychar, 1girl", None])
    _, items = _scan(caplog, train_data_dir=str(tmp_path / "train"))
    assert [i.caption for i in items] == ["tok1, mychar, 1girl, smile", "tok1, mychar, 1girl", TEMPLATE]
    prepended = _warnings(caplog, "did not contain 'tok1'")
    assert len(prepended) == 1 and prepended[0].startswith(
        "2 caption(s) did not contain 'tok1'; it was prepended to them; their first tag is 'mychar': if it is your "
        "trigger word, train it as the pivot with --token_string mychar")
    _, items = _scan(caplog, train_data_dir=str(tmp_path / "train"), token_string="mychar")
    assert [i.caption for i in items] == ["mychar, 1girl, smile", "mychar, 1girl", "mychar"]
    assert "prepended" not in caplog.text and "have no caption file" in caplog.text


def test_the_folder_name_is_suggested_when_first_tags_differ_and_nothing_without_a_kohya_name(tmp_path, caplog):
    _folder(tmp_path / "train" / "5_mychar", ["1girl, smile", "solo, outdoors"])
    _scan(caplog, train_data_dir=str(tmp_path / "train"))
    assert "their folder's name is 'mychar': if it is your trigger word, train it as the pivot with --token_string " \
           "mychar" in caplog.text
    _folder(tmp_path / "imgs", ["1girl, smile", "solo, outdoors"])
    (tmp_path / "data.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n")
    _scan(caplog, dataset_config=str(tmp_path / "data.toml"))
    assert "2 caption(s) did not contain 'tok1'; it was prepended to them" in caplog.text
    assert "--token_string" not in caplog.text


def test_no_usable_training_image_counts_only_the_training_folders_files(tmp_path):
    """The reg folder's 5 images were counted in "looked at N image file(s)" (7 for 2 training files)."""
    train = tmp_path / "train" / "10_tok1 1girl"
    train.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (train / name).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _folder(tmp_path / "reg" / "1_1girl", [None] * 5)
    config = build_config({"resolution": 32, "train_data_dir": str(tmp_path / "train"),
                           "reg_data_dir": str(tmp_path / "reg")})
    with pytest.raises(ConfigError, match=r"10_tok1 1girl: looked at 2 image file\(s\), rejected 2"):
        scan_images(config, load_subsets(config))


def test_the_dataset_preview_shows_the_folder_name_caption_and_the_warning(tmp_path):
    _folder(tmp_path / "train" / "2_tok1 1girl", [None, None])
    config = build_config({"train_data_dir": str(tmp_path / "train"), "resolution": 32})
    preview = preview_dataset(config, n=4)
    assert [s.caption for s in preview.samples] == ["tok1 1girl"] * 4
    assert any(note.startswith("2 training image(s) have no caption file") for note in preview.notes)


def test_a_dataset_config_image_dir_missing_beside_it_is_read_from_the_current_folder_as_kohya(tmp_path, caplog,
                                                                                                monkeypatch):
    """kohya reads ``image_dir = "imgs"`` relative to the current folder; pti-plugin beside the TOML first (a resume
    or sweep reads it from anywhere). Missing beside the TOML, the current folder's is read with a warning naming
    both (before: refused as not found); found beside it, that one is read, silently, even where the current folder
    has one too."""
    work, configs = tmp_path / "work", tmp_path / "configs"
    _folder(work / "imgs", ["tok1, from the current folder"])
    configs.mkdir()
    (configs / "data.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n")
    monkeypatch.chdir(work)
    subsets, items = _scan(caplog, dataset_config=str(configs / "data.toml"))
    assert subsets[0].image_dir == work / "imgs" and [i.caption for i in items] == ["tok1, from the current folder"]
    warned = _warnings(caplog, "is not found beside the dataset_config")
    assert len(warned) == 1 and f"({configs / 'imgs'}) but in the current folder ({work / 'imgs'})" in warned[0]
    _folder(configs / "imgs", ["tok1, beside the toml"])
    _, items = _scan(caplog, dataset_config=str(configs / "data.toml"))
    assert [i.caption for i in items] == ["tok1, beside the toml"] and "not found beside" not in caplog.text
