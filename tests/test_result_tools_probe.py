"""The README's "Using the result" tools on what a user may hand them: ``load_pti`` and ``python -m pti_plugin.inspect``
refuse each wrong file with a message naming it and what is wrong, before the pipeline changes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pti_plugin.formats import LoraFormatError, bundle_embedding_keys, save_embedding, to_kohya
from pti_plugin.inspect import main as inspect_main
from pti_plugin.load_pti import load_pti

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # a UNet module every SD1.5-shaped model has


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(pipe, nan: bool = False) -> dict[str, torch.Tensor]:
    """A one-module kohya LoRA for ``pipe``'s UNet plus a bundled 2-vector ``tok1``."""
    layer = pipe.unet.get_submodule(MODULE)
    down, up = torch.randn(4, layer.in_features), torch.randn(layer.out_features, 4)
    if nan:
        down[0, 0] = float("nan")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    peft = {f"{MODULE}.lora_A.weight": down, f"{MODULE}.lora_B.weight": up}
    return to_kohya(peft, {}, 2.0) | bundle_embedding_keys("tok1", torch.randn(2, width))


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("files")
    pipe = _pipe(tiny_model)
    save_file(_lora(pipe), out / "pti.safetensors")
    save_file(_lora(pipe, nan=True), out / "nan.safetensors")
    save_embedding(out / "tok1.safetensors", torch.randn(2, 32))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.hada_w1_a": torch.zeros(32, 4), f"{name}.hada_w1_b": torch.zeros(4, 32),
               f"{name}.alpha": torch.tensor(4.0)}, out / "loha.safetensors")
    save_file({f"unet.{MODULE}.lora_A.weight": torch.zeros(4, 32), f"unet.{MODULE}.lora_B.weight": torch.zeros(32, 4)},
              out / "peft.safetensors")
    xl = "lora_unet_input_blocks_4_1_proj_in"  # kohya's SDXL name of a module SD1.5 does not have
    save_file({f"{xl}.lora_down.weight": torch.zeros(4, 8), f"{xl}.lora_up.weight": torch.zeros(8, 4),
               f"{xl}.alpha": torch.tensor(4.0)}, out / "sdxl.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "tok1"}, out / "a1111.pt")
    save_file({}, out / "empty.safetensors")
    (out / "folder").mkdir()
    return out


@pytest.mark.parametrize("name, error, message", [
    ("missing.safetensors", FileNotFoundError, "missing.safetensors: no such file"),
    ("folder", IsADirectoryError, "folder: is a folder, not a LoRA file"),
    ("tok1.safetensors", LoraFormatError, "tok1.safetensors: .*it is a textual-inversion embedding, not a LoRA"),
    ("sdxl.safetensors", LoraFormatError, "sdxl.safetensors: .*it is an SDXL file and this is an SD1.5 model"),
    ("loha.safetensors", LoraFormatError, "loha.safetensors: .*LyCORIS LoHa"),
    ("peft.safetensors", LoraFormatError, "peft.safetensors: .*peft/diffusers-format LoRA"),
    ("a1111.pt", LoraFormatError, "a1111.pt: not a .safetensors file"),
    ("nan.safetensors", LoraFormatError, "nan.safetensors: tensor .*lora_down.weight' holds NaN"),
])
def test_load_pti_names_the_wrong_file_and_what_it_is(files, tiny_model, name, error, message):
    pipe = _pipe(tiny_model)
    with pytest.raises(error, match=message):
        load_pti(pipe, files / name)
    assert not pipe.get_list_adapters() and "tok1" not in pipe.tokenizer.get_vocab()


def test_load_pti_twice_is_refused_before_a_second_lora_goes_in(files, tiny_model):
    pipe = _pipe(tiny_model)
    assert load_pti(pipe, files / "pti.safetensors") == "tok1"
    adapters = pipe.get_list_adapters()
    with pytest.raises(ValueError, match=r"pti.safetensors: token 'tok1' is already in this pipeline's tokenizer"):
        load_pti(pipe, files / "pti.safetensors")
    assert pipe.get_list_adapters() == adapters  # diffusers would refuse the token only after adding the LoRA again
    assert load_pti(pipe, files / "pti.safetensors", token="tok2") == "tok2"  # the way out the message gives


@pytest.mark.parametrize("name, code, expected", [
    ("empty.safetensors", 1, "format: unknown (neither a kohya LoRA nor an embedding) (the file holds no tensors)"),
    ("nan.safetensors", 1, "tensors holding NaN or infinite values: 1\n  lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("loha.safetensors", 1, "note: it is a LyCORIS LoHa/LoKr file"),
    ("folder", 2, "folder: is a folder; pass a LoRA or embedding file"),
    ("missing.safetensors", 2, "missing.safetensors: no such file"),
])
def test_inspect_says_what_is_wrong(files, capsys, name, code, expected):
    assert inspect_main([str(files / name)]) == code
    seen = capsys.readouterr()
    assert expected in seen.out + seen.err and "Traceback" not in seen.out + seen.err
