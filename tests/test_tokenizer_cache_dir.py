"""kohya's ``tokenizer_cache_dir``: kohya keeps the CLIP tokenizer it downloaded once in
``<dir>/openai_clip-vit-large-patch14`` (``strategy_base._load_tokenizer``); that folder becomes ``tokenizer_path``,
which single-file checkpoints read. pti-plugin never downloads, so a folder without it is refused naming the key."""

from __future__ import annotations

import shutil

import pytest

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.models.single_file import load_clip_tokenizer


def test_kohyas_saved_tokenizer_becomes_the_tokenizer_path(preset, tiny_model, tmp_path):
    cache = tmp_path / "tokenizers"
    shutil.copytree(tiny_model / "tokenizer", cache / "openai_clip-vit-large-patch14")  # kohya's save_pretrained layout
    config = build_config(preset(tokenizer_cache_dir=str(cache)))
    assert (config.tokenizer_path, config.tokenizer_cache_dir) == (str(cache / "openai_clip-vit-large-patch14"), "")
    from transformers import CLIPTokenizer

    expected = CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer"))("a photo of a square").input_ids
    assert load_clip_tokenizer(config.tokenizer_path)("a photo of a square").input_ids == expected


def test_a_cache_dir_without_the_tokenizer_or_beside_tokenizer_path_is_refused_naming_the_key(preset, tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"key 'tokenizer_cache_dir': .*openai_clip-vit-large-patch14 holds no CLIP "
                                          r"tokenizer .*never downloads"):
        build_config(preset(tokenizer_cache_dir=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"key 'tokenizer_cache_dir'.* and tokenizer_path .*both name the tokenizer"):
        build_config(preset(tokenizer_cache_dir=str(tmp_path / "empty"), tokenizer_path=str(tiny_model / "tokenizer")))
