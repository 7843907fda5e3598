"""Files written the Windows way: Notepad's UTF-8 with BOM, CRLF line endings and UTF-16 ("Unicode"); Windows paths in
TOML strings and on the command line; upper-case extensions of images and captions; Explorer's own files.

Each either reads as on Windows (where the files were made) or is refused before training, naming the file or key
and what to do."""

from __future__ import annotations

import json
import logging
import os

import pytest

from pti_plugin.cli import main
from pti_plugin.config import load_preset_dict
from pti_plugin.config_loading import build_config
from pti_plugin.data.dataset import load_subsets
from pti_plugin.data.scanning import scan_images
from pti_plugin.sampling import prompt_file_entries
from tests.conftest import draw_character

BOM = b"\xef\xbb\xbf"


def notepad(text: str, encoding: str = "utf-8", bom: bool = False, crlf: bool = True) -> bytes:
    """``text`` as Notepad saves it: CRLF line ends, optionally a UTF-8 byte-order mark, or UTF-16 with its mark."""
    text = text.replace("\n", "\r\n") if crlf else text
    if encoding == "utf-16":
        return text.encode("utf-16")  # Python writes the mark, as Notepad's "Unicode" does
    return (BOM if bom else b"") + text.encode(encoding)


# ----------------------------------------------------------------------------- presets, config_file, dataset_config

def test_a_preset_and_kohya_config_file_saved_by_notepad_read_as_written(tmp_path):
    (tmp_path / "kohya.toml").write_bytes(notepad('[model]\nnetwork_dim = 8\n[training]\nseed = 7\n', bom=True))
    (tmp_path / "p.toml").write_bytes(notepad('config_file = "kohya.toml"\nlearning_rate = 0.5\n', bom=True))
    raw = load_preset_dict(tmp_path / "p.toml")
    assert (raw["learning_rate"], raw["network_dim"], raw["seed"]) == (0.5, 8, 7)


def test_a_dataset_config_with_bom_and_crlf_is_read_with_its_batch_size(preset, tiny_dataset, tmp_path):
    config = tmp_path / "ds.toml"
    config.write_bytes(notepad(f"[general]\nbatch_size = 3\n[[datasets]]\n[[datasets.subsets]]\n"
                               f"image_dir = '{tiny_dataset / '2_tok1'}'\nnum_repeats = 5\n", bom=True))
    built = build_config(preset(train_data_dir="", dataset_config=str(config)))
    assert built.train_batch_size == 3  # before: the BOM hid the dataset's batch_size, then the file was refused
    assert [s.num_repeats for s in load_subsets(built)] == [5]


@pytest.mark.parametrize("which", ["preset", "config_file", "dataset_config"])
def test_utf16_toml_is_refused_naming_the_file_and_how_to_save_it(tmp_path, tiny_dataset, capsys, which):
    good = tmp_path / "good.toml"
    good.write_text(f"train_data_dir = '{tiny_dataset}'\n")
    bad = tmp_path / "unicode.toml"
    bad.write_bytes(notepad("[general]\nbatch_size = 2\n" if which == "dataset_config" else "seed = 1\n", "utf-16"))
    args = {"preset": ["--preset", str(bad)], "config_file": ["--preset", str(good), "--config_file", str(bad)],
            "dataset_config": ["--dataset_config", str(bad)]}[which]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not valid TOML: it is UTF-16 text" in err and "save it as UTF-8" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("what", ["preset", "dataset_config"])
def test_a_windows_path_in_a_basic_toml_string_is_named_with_its_line_and_the_fix(tmp_path, capsys, what):
    bad = tmp_path / "bad.toml"
    line = 'train_data_dir = "C:\\Users\\me\\data"' if what == "preset" else 'image_dir = "D:\\data\\2_tok1"'
    bad.write_bytes(notepad(f"[[datasets]]\n[[datasets.subsets]]\n{line}\n" if what == "dataset_config"
                            else f"seed = 1\n{line}\n"))
    assert main(["--preset" if what == "preset" else "--dataset_config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not valid TOML" in err and f": {line}\n" in err
    assert "single quotes ('C:\\Users\\me\\data') or with forward slashes" in err


@pytest.mark.skipif(os.name == "nt", reason="a drive-letter path is an ordinary path on Windows")
@pytest.mark.parametrize("value, hint", [
    ("C:\\Users\\me\\data", "looks like a Windows path (drive C:)"),  # a literal '...' string
    ("C:/Users/me/data", "looks like a Windows path (drive C:)"),
    ("C:\temp\new", "holds a tab or a line break"),  # "C:\temp\new" in a TOML basic string: a valid tab and newline
])
def test_a_windows_path_that_does_not_exist_here_says_so(tmp_path, capsys, tiny_model, value, hint):
    preset_path = tmp_path / "p.toml"
    preset_path.write_text(f"pretrained_model_name_or_path = '{tiny_model}'\ntrain_data_dir = {json.dumps(value)}\n")
    assert main(["--preset", str(preset_path)]) == 2
    err = capsys.readouterr().err
    assert "key 'train_data_dir': path not found" in err and hint in err
    if "drive" in hint:
        assert "under WSL: /mnt/c/Users/me/data" in err


@pytest.mark.skipif(os.name == "nt", reason="'\\' is the folder separator on Windows")
@pytest.mark.parametrize("given", [".\\data", "data\\"])
def test_a_backslash_path_on_the_command_line_is_named_with_the_forward_slash_form(tmp_path, capsys, tiny_model,
                                                                                   given, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", given]) == 2
    err = capsys.readouterr().err
    assert "--train_data_dir (command line): path not found" in err
    assert f"write '{tmp_path / 'data'}' (forward slashes" in err


# ----------------------------------------------------------------------------- dataset folders

def test_upper_case_extensions_and_explorer_files(preset, tmp_path, caplog):
    """Images in any case are trained; a ``.TXT``/``.Txt`` caption of an image is read (Windows finds it; kohya on
    Linux would not), with one warning; ``Thumbs.db`` and ``desktop.ini`` are ignored silently, as kohya; CRLF,
    a trailing CR and a BOM never reach the caption."""
    folder = tmp_path / "data" / "1_tok1"
    folder.mkdir(parents=True)
    for i, name in enumerate(["a.PNG", "b.JPG", "c.Jpeg", "d.WEBP", "e.png", "f.png", "g.png"]):
        draw_character(folder / name, i)
    (folder / "a.TXT").write_bytes(b"tok1 upper\r\n")
    (folder / "b.Txt").write_bytes(BOM + b"tok1 mixed\r\nsecond line\r\n")
    (folder / "e.txt").write_bytes(b"tok1 trailing cr\r")
    (folder / "f.txt").write_bytes(BOM + b"tok1 with a bom")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "desktop.ini").write_bytes(notepad("[.ShellClassInfo]\nIconResource=x\n", "utf-16"))
    with caplog.at_level(logging.WARNING):
        built = build_config(preset(train_data_dir=str(tmp_path / "data"), caption_template="{} plain"))
        items = scan_images(built, load_subsets(built))
    captions = {item.path.name: item.caption for item in items}
    assert captions == {"a.PNG": "tok1 upper", "b.JPG": "tok1 mixed", "c.Jpeg": "tok1", "d.WEBP": "tok1",  # folder name
                        "e.png": "tok1 trailing cr", "f.png": "tok1 with a bom", "g.png": "tok1"}
    warned = [r.getMessage() for r in caplog.records if "only in letter case" in r.getMessage()]
    assert len(warned) == 1 and "2 caption file(s)" in warned[0] and "a.TXT, b.Txt" in warned[0]
    assert "Thumbs.db" not in caplog.text and "desktop.ini" not in caplog.text


def test_metadata_json_with_a_bom_is_read(preset, tiny_dataset, tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_bytes(BOM + json.dumps({"0.png": {"caption": "tok1 from json"}}).encode())
    config = tmp_path / "ds.toml"
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tiny_dataset / '2_tok1'}'\n"
                      f"metadata_file = '{meta}'\n")
    built = build_config(preset(train_data_dir="", dataset_config=str(config)))
    assert [item.caption for item in scan_images(built, load_subsets(built))] == ["tok1 from json"]


# ----------------------------------------------------------------------------- sample prompts

@pytest.mark.parametrize("name, text", [
    ("p.txt", "# comment\na tok1 cat --n blurry\n\nsecond tok1 --w 64\n"),
    ("p.toml", '[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a tok1 cat"\n'
               '[[prompt.subset]]\nprompt = "second tok1"\n'),
    ("p.json", '["a tok1 cat --n blurry",\n "second tok1 --w 64"]\n'),
])
def test_sample_prompts_saved_by_notepad_read_without_stray_characters(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(notepad(text, bom=True))
    entries = [entry if isinstance(entry, str) else entry["prompt"] for _, entry in prompt_file_entries(path)]
    assert [e.split(" --")[0] for e in entries] == ["a tok1 cat", "second tok1"]
    assert not any("\r" in e or "\ufeff" in e for e in entries)
    path.write_bytes(notepad(text, "utf-16"))
    with pytest.raises(ValueError, match='is UTF-16 text \\(Notepad\'s "Unicode"\\), not UTF-8: save it as UTF-8'):
        prompt_file_entries(path)
