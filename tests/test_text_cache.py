"""cache_text_encoder_outputs with the text encoders off the device: the captions a stage can draw are all
encoded up front, nothing encodes during the stage, and the result is the uncached run's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.data.captions import CaptionOptions, final_caption, possible_captions
from pti_plugin.models.trainable import TrainableModel
from pti_plugin.text_cache import TextConditioningCache
from pti_plugin.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Item:  # the fields final_caption reads from an ImageItem
    caption: str
    caption_options: CaptionOptions = CaptionOptions()
    caption_lines: tuple[str, ...] = ()
    is_reg: bool = False


def drawn(item: Item, draws: int = 300) -> set[str]:
    """The captions final_caption gives ``item`` over many draws and epochs."""
    return {final_caption(item, torch.Generator().manual_seed(k), 1 + k % 4, "tok1", 2) for k in range(draws)}


@pytest.mark.parametrize("options, is_reg", [
    (CaptionOptions(), False),
    (CaptionOptions(caption_dropout_rate=0.3, caption_prefix="best, "), False),
    (CaptionOptions(caption_dropout_every_n_epochs=2, keep_tokens=1), False),
    (CaptionOptions(caption_dropout_rate=0.3), True),
])
def test_possible_captions_are_exactly_what_the_draws_give(options, is_reg):
    item = Item("tok1, red hair, smile", options, is_reg=is_reg)
    assert set(possible_captions(item, "tok1", 2)) == drawn(item)


@pytest.mark.parametrize("options, lines", [
    (CaptionOptions(shuffle_caption=True), ()),
    (CaptionOptions(caption_tag_dropout_rate=0.2), ()),
    (CaptionOptions(enable_wildcard=True), ("tok1, a", "tok1, b")),
    (CaptionOptions(enable_wildcard=True), ("tok1, {red|blue} hair",)),
])
def test_captions_that_vary_have_no_known_set(options, lines):
    item = Item(lines[0] if lines else "tok1, red hair, smile", options, caption_lines=lines)
    assert len(drawn(item)) > 1 and possible_captions(item, "tok1", 2) is None


def _offload_on_cpu(monkeypatch) -> dict:
    """Let the cache offload on a CPU device: the encoders are marked away (there is nothing to move them from)."""
    seen = {"offloads": 0}
    monkeypatch.setattr(TextConditioningCache, "_can_offload", lambda self: True)

    def offload(self):
        seen["offloads"] += 1
        self._text_home = torch.device("cpu")

    monkeypatch.setattr(TrainableModel, "offload_text_encoders", offload)
    return seen


def _run(raw, capsys) -> tuple[Path, Trainer, str]:
    trainer = Trainer(build_config(raw))
    trainer.run()
    return Path(trainer.config.output_dir), trainer, capsys.readouterr().out


STAGES = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2, "optimizer_type": "SGD"},
          {"kind": "lora", "steps": 4, "learning_rate": 5e-1, "optimizer_type": "SGD"}]


def test_offloaded_stage_never_encodes_and_trains_as_without_the_cache(preset, tmp_path, monkeypatch, capsys):
    plain, _, _ = _run(preset(output_dir=str(tmp_path / "a"), stages=STAGES, save_precision="float",
                              caption_dropout_rate=0.5), capsys)
    seen = _offload_on_cpu(monkeypatch)
    encodes_away = []
    encode = TrainableModel.encode
    monkeypatch.setattr(TrainableModel, "encode", lambda self, ids, *a, **k: (
        encodes_away.append(self.text_encoders_away), encode(self, ids, *a, **k))[1])
    cached, trainer, out = _run(preset(output_dir=str(tmp_path / "b"), stages=STAGES, save_precision="float",
                                       caption_dropout_rate=0.5, cache_text_encoder_outputs=True), capsys)
    a, b = load_file(plain / "pti.safetensors"), load_file(cached / "pti.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert seen["offloads"] == 1  # the LoRA stage only (the inversion stage trains the pivot)
    assert "text encoders moved to the CPU for this stage (2 captions encoded up front)" in out
    assert not any(encodes_away) and trainer.model.text_returns == 0
    assert not trainer.model.text_encoders_away  # back on the device after the stage


@register_plugin
class EncodingPlugin(Plugin):
    """Encodes a prompt through ``state.encode`` at every step end (as a plugin may)."""

    name = "test_encoding"

    def on_step_end(self, state, logs):
        with torch.no_grad():
            state.encode(state.tokenize(["a tok1"]).to(state.device))


def test_an_encode_during_the_stage_brings_the_encoders_back(preset, tmp_path, monkeypatch, capsys):
    seen = _offload_on_cpu(monkeypatch)
    _, trainer, out = _run(preset(output_dir=str(tmp_path / "b"), stages=STAGES, cache_text_encoder_outputs=True,
                                  plugins={"test_encoding": {}, "pivot_locality": {}}), capsys)
    assert seen["offloads"] == 1 and trainer.model.text_returns == 1
    assert "came back to the device during the stage" in out


def test_captions_that_vary_keep_the_encoders(preset, tmp_path, monkeypatch, capsys):
    seen = _offload_on_cpu(monkeypatch)
    _, trainer, out = _run(preset(output_dir=str(tmp_path / "b"), stages=STAGES, cache_text_encoder_outputs=True,
                                  shuffle_caption=True), capsys)
    assert seen["offloads"] == 0 and "moved to the CPU" not in out


def test_the_start_up_block_names_the_stages_whose_text_side_is_cached(preset, tmp_path, capsys):
    """Which stages encode once is said at start; asked for where no stage qualifies, the block says so (it used to
    print 'in frozen-text stages' whatever the stages)."""
    stages = [dict(STAGES[0], steps=1), dict(STAGES[1], steps=1, name="look")]
    _, _, out = _run(preset(output_dir=str(tmp_path / "a"), stages=stages, cache_text_encoder_outputs=True), capsys)
    assert "text-encoder outputs in stages 'look'" in out
    stages[1]["train_text_encoder"] = True
    _, _, out = _run(preset(output_dir=str(tmp_path / "b"), stages=stages, cache_text_encoder_outputs=True), capsys)
    assert "text-encoder outputs asked, but every stage trains the text side" in out
