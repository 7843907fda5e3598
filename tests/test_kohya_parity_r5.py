"""kohya parity, round 5: SDXL's windows at the second tokenizer's pad token, the ``"W,H"`` size text, and the
LoRA file's ``sshs_*`` hashes.

Window ids are written out by hand from kohya's ``strategy_base._get_input_ids`` (the branch for a tokenizer whose
pad token is not EOS, SDXL's second): each window is BOS, 75 ids, the last id; ``if ids_chunk[-2] not in (EOS,
pad): ids_chunk[-1] = EOS``; ``if ids_chunk[1] == pad: ids_chunk[1] = EOS``. The first tokenizer pads with EOS
(kohya's other branch): its windows are kept as cut.
"""

from __future__ import annotations

import pytest
import torch


def test_sdxl_windows_start_with_eos_where_a_filling_caption_has_the_pad_token(tiny_sdxl):
    """max_token_length 150, the caption ``! red x 74, ! red x 80``: 150 tokens and more, so the ids end with EOS,
    not padding, and each window of 75 opens with ``!``, which the second tokenizer (its pad token, so never split)
    reads as its pad id and the first as the word ``!</w>``. kohya writes EOS over the second tokenizer's; the first
    tokenizer's windows are kept as cut. The pooled output is the first window's at its first EOS: position 1."""
    from pti_plugin.models.loading import load_base_model

    base = load_base_model(str(tiny_sdxl), max_token_length=150)
    tok1, tok2 = base.tokenizers
    caption = "! " + " ".join(["red"] * 74) + " ! " + " ".join(["red"] * 80)
    bang, bang_w, red = tok1.convert_tokens_to_ids(["!", "!</w>", "red</w>"])
    assert tok2.pad_token_id == bang and tok1.pad_token_id == tok1.eos_token_id
    bos, eos = tok1.bos_token_id, tok1.eos_token_id
    ids = base.tokenize([caption])
    assert ids[0, 0].tolist() == [bos, bang_w] + [red] * 74 + [bang_w] + [red] * 74 + [eos]
    assert ids[0, 1].tolist() == [bos, bang] + [red] * 74 + [bang] + [red] * 74 + [eos]
    first = [[bos, bang_w] + [red] * 74 + [eos]] * 2  # kohya's windows of tokenizer 1: as cut
    second = [[bos, eos] + [red] * 74 + [eos]] * 2  # tokenizer 2: the opening pad id becomes EOS
    te1, te2 = base.text_encoders
    with torch.no_grad():
        ours = base.encode(ids)
        parts = []
        for te, windows in ((te1, first), (te2, second)):
            out = te(torch.tensor(windows), output_hidden_states=True)
            h = out.hidden_states[-2]
            parts.append(torch.cat([h[0, :1], h[0, 1:76], h[1, 1:76], h[1, 76:]]))
        pooled = te2.text_projection(out.last_hidden_state[0, 1])
    torch.testing.assert_close(ours.hidden_states[0], torch.cat(parts, dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.added_cond_kwargs["text_embeds"][0], pooled, rtol=0, atol=1e-6)


def test_sdxl_window_ids_by_kohyas_rule():
    """The rule on hand-written ids (BOS 10, EOS 11, pad 0; 2 windows of 75): a caption filling 150 whose windows
    open with the pad id and close on it; a short caption (padded: the second window is BOS EOS pad ... pad)."""
    from pti_plugin.models.sdxl import window_ids

    eos = torch.tensor([[11]])
    filling = [10, 0] + [5] * 73 + [0] + [0] + [6] * 74 + [11]  # window 1 ends on 0; window 2 opens with 0
    first, second = window_ids(torch.tensor([filling]), eos, 0)
    assert first.tolist() == [[10, 11] + [5] * 73 + [0, 11]]  # 75th id is pad: the last id (EOS) is kept
    assert second.tolist() == [[10, 11] + [6] * 74 + [11]]
    short = [10, 0, 5, 11] + [0] * 148
    first, second = window_ids(torch.tensor([short]), eos, 0)
    assert first.tolist() == [[10, 11, 5, 11] + [0] * 73]
    assert second.tolist() == [[10, 11] + [0] * 75]
    runs_past = [10] + [5] * 150 + [11]  # the first window's 75th id is text: its last id becomes EOS
    assert [w[0, -1].item() for w in window_ids(torch.tensor([runs_past]), eos, 0)] == [11, 11]


#: kohya's ``prepare_dataset_args``: ``tuple(int(r) for r in resolution.split(","))``, one part a square, then
#: ``assert len == 2``. ``int()`` takes spaces around a number; ``"512,"`` has an empty part, which it refuses.
SIZE_TEXTS = [("512", 512), ("512,768", [512, 768]), (" 640 , 512", [640, 512]), ("512,", None), ("a,b", None),
              ("640,512,3", None), ("512x512", None), ("512.0", None), ("", None)]


def _size_error(text: str) -> str:
    return f" expects a size as kohya writes it, 'SIZE' or 'WIDTH,HEIGHT' in whole numbers, got {text!r}"


@pytest.mark.parametrize("text, expected", SIZE_TEXTS)
def test_a_size_text_reads_alike_on_the_command_line_and_from_a_kohya_config_file(tmp_path, text, expected):
    """The same ``"W,H"`` text gives the same size, or the same refusal quoting the text as typed, whether given as
    ``--resolution`` or as a kohya config file's ``resolution = "..."``."""
    import re

    from pti_plugin.command_line import parse_args
    from pti_plugin.config import ConfigError
    from pti_plugin.config_loading import load_config

    (tmp_path / "imgs").mkdir()
    (tmp_path / "kohya.toml").write_text(f'train_data_dir = "imgs"\nresolution = "{text}"\n')
    (tmp_path / "p.toml").write_text('config_file = "kohya.toml"\n')
    if expected is None:
        with pytest.raises(ConfigError, match="^" + re.escape("--resolution (command line)" + _size_error(text)) + "$"):
            parse_args(["--resolution", text])
        with pytest.raises(ConfigError, match="^" + re.escape(f"config_file {tmp_path / 'kohya.toml'}: key 'resolution'"
                                                               + _size_error(text)) + "$"):
            load_config(tmp_path / "p.toml")
        return
    assert parse_args(["--resolution", text])[1] == {"resolution": expected}
    assert load_config(tmp_path / "p.toml").resolution == expected


def test_skip_image_resolution_takes_the_same_size_text_on_the_command_line():
    from pti_plugin.command_line import parse_args
    from pti_plugin.config import ConfigError

    assert parse_args(["--skip_image_resolution", "256,192"])[1] == {"skip_image_resolution": [256, 192]}
    assert parse_args(["--skip_image_resolution", "[256, 192]"])[1] == {"skip_image_resolution": [256, 192]}
    with pytest.raises(ConfigError, match=r"^--skip_image_resolution \(command line\) expects a size .*, got '256,'$"):
        parse_args(["--skip_image_resolution", "256,"])


def _lora_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {f"{name}.lora_down.weight": torch.randn(256, 1024, generator=generator),  # 1 MiB each: the legacy hash
            f"{name}.lora_up.weight": torch.randn(1024, 256, generator=generator).half(),  # reads past 1 MiB
            f"{name}.alpha": torch.tensor(4.0)}


BIG = "x" * (0x100000 + 5)  # a header past 1 MiB: the legacy hash then reads header bytes
METADATA_CASES = {
    "plain": {"ss_network_dim": "256", "ss_network_alpha": "4.0", "pti_token": "tok1", "modelspec.title": "pti"},
    "escaped": {"ss_training_comment": 'say "hi"\\ \n\t\x01\x1f\x7f é 😀 </>', "pti_note": 'q"\\\x02 ü', "ss_x": ""},
    "no_ss_keys": {"pti_token": "tok1", "modelspec.title": 'a "b"'},
    "ss_header_past_1_mib": {"ss_tag_frequency": BIG, "pti_token": "tok1"},
    "other_header_past_1_mib": {"ss_network_dim": "256", "pti_big": BIG},
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_the_weight_hashes_are_kohyas_whatever_the_metadata(tmp_path, case):
    """kohya's ``precalculate_safetensors_hashes``, written out: ``safetensors.torch.save`` of the tensors with the
    ``ss_*`` keys alone; ``sshs_model_hash`` the sha256 after its header, ``sshs_legacy_hash`` of its 64 KiB at 1 MiB
    (8 hex digits). Metadata with JSON escapes, with no ``ss_*`` key, and headers past 1 MiB (of the ``ss_*`` file,
    of the saved one)."""
    import hashlib
    import struct

    from safetensors import safe_open
    from safetensors.torch import save

    from pti_plugin.formats.kohya_lora import save_lora

    tensors, metadata = _lora_tensors(), METADATA_CASES[case]
    kohyas = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (length,) = struct.unpack("<Q", kohyas[:8])
    expected = {"sshs_model_hash": hashlib.sha256(kohyas[8 + length:]).hexdigest(),
                "sshs_legacy_hash": hashlib.sha256(kohyas[0x100000:0x110000]).hexdigest()[:8]}
    save_lora(tmp_path / "pti.safetensors", tensors, metadata)
    with safe_open(str(tmp_path / "pti.safetensors"), framework="pt") as handle:
        assert handle.metadata() == dict(metadata) | expected
        assert all(torch.equal(handle.get_tensor(k), v) and handle.get_tensor(k).dtype == v.dtype
                   for k, v in tensors.items())


@pytest.mark.parametrize("case", ["plain", "escaped", "no_ss_keys", "other_header_past_1_mib"])
def test_a_lora_is_serialised_once_to_be_hashed_and_written(tmp_path, monkeypatch, case):
    """The hashes are taken from the data of the file being written (the data does not depend on the header), not
    from a second serialisation of every tensor (which only an ``ss_*`` header past 1 MiB still takes)."""
    import safetensors.torch

    from pti_plugin.formats.kohya_lora import save_lora

    calls, real = [], safetensors.torch.save
    monkeypatch.setattr(safetensors.torch, "save", lambda *a, **k: calls.append(1) or real(*a, **k))
    save_lora(tmp_path / "pti.safetensors", _lora_tensors(), METADATA_CASES[case])
    assert len(calls) == 1
