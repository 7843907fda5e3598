"""SDXL files: a LoRA (UNet + both text encoders) and a two-encoder pivot written by
``write_lora_and_embedding`` reload through ``load_pti`` / diffusers into a tiny SDXL pipeline and
reproduce the in-memory model; the embedding layouts; ``inspect``."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from pti_plugin.config_loading import build_config
from pti_plugin.formats.embedding import EmbeddingFormatError
from pti_plugin.formats.kohya_lora import LoraFormatError, kohya_to_peft, peft_to_kohya
from pti_plugin.inspect import main as inspect_main
from pti_plugin.load_pti import load_pti
from pti_plugin.models.lora import attach_lora, lora_parameters, lora_state_dict
from pti_plugin.models.sdxl_keys import SDXL_EMBEDDING_LAYOUT, sdxl_key_table
from pti_plugin.models.tiny_sdxl import TINY_SDXL_TEXT_DIMS, build_tiny_sdxl
from pti_plugin.outputs import RunFiles, write_lora_and_embedding

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 1.0
PROMPT = "an anime illustration of tok1"
#: A stand-in for the SDXL model family: what write_lora_and_embedding asks of one.
SDXL = types.SimpleNamespace(name="sdxl", key_table=sdxl_key_table(), embedding_layout=SDXL_EMBEDDING_LAYOUT)


def _pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


def _add_pivot(pipe, vectors: tuple[torch.Tensor, ...]) -> None:
    """tok1 (2 vectors, diffusers' tok1 + tok1_1) in both encoders, as ``load_textual_inversion`` would add it."""
    for name, v in zip(("text_encoder", "text_encoder_2"), vectors):
        encoder, tokenizer = getattr(pipe, name), getattr(pipe, name.replace("text_encoder", "tokenizer"))
        tokenizer.add_tokens(["tok1", "tok1_1"])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(["tok1", "tok1_1"])] = v


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """An in-memory 'trained' SDXL pipeline (random LoRA + LoCon on the UNet, LoRA on both text encoders,
    a 2-vector pivot per encoder) and the files write_lora_and_embedding made of it."""
    pipe = _pipe(tiny)
    table = sdxl_key_table()
    conv = table.peft_targets("unet", pipe.unet, conv=True)
    attach_lora(pipe.unet, table.peft_targets("unet", pipe.unet) + conv, RANK, ALPHA,
                overrides={p: (CONV_RANK, CONV_ALPHA) for p in conv})
    for name in ("text_encoder", "text_encoder_2"):
        attach_lora(getattr(pipe, name), table.peft_targets(name, getattr(pipe, name)), RANK, ALPHA)
    gen = torch.Generator().manual_seed(1)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for model in components.values():
        for param in lora_parameters(model):
            param.data = torch.randn(param.shape, generator=gen) * 0.2
    vectors = tuple(torch.randn(2, d, generator=gen) for d in TINY_SDXL_TEXT_DIMS)
    _add_pivot(pipe, vectors)

    out = tmp_path_factory.mktemp("out")
    config = build_config({"train_data_dir": str(out), "token_string": "tok1", "init_word": "girl",
                           "num_vectors_per_token": 2, "output_name": "pti", "network_dim": RANK,
                           "network_alpha": ALPHA, "save_precision": "float", "network_args": [f"conv_dim={CONV_RANK}", f"conv_alpha={CONV_ALPHA}"]},
                          check_paths=False)
    lora = {name: lora_state_dict(model) for name, model in components.items()}
    alphas = {p: (CONV_ALPHA if p in conv else ALPHA) for state in lora.values()
              for p in {k.rsplit(".lora_", 1)[0] for k in state}}
    paths = write_lora_and_embedding(RunFiles(out, "pti", "tok1"), None, lora, alphas, vectors, config, 10, {},
                                     family=SDXL)
    return types.SimpleNamespace(pipe=pipe, vectors=vectors, lora=lora, alphas=alphas, paths=paths)


def _unet_inputs():
    gen = torch.Generator().manual_seed(7)
    d1, d2 = TINY_SDXL_TEXT_DIMS
    return dict(
        sample=torch.randn(1, 4, 16, 16, generator=gen), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 77, d1 + d2, generator=gen),
        added_cond_kwargs={"text_embeds": torch.randn(1, d2, generator=gen), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])},
    )


def _outputs(pipe) -> dict[str, torch.Tensor]:
    """The UNet's noise prediction on a fixed input and the prompt's conditioning (per-token and pooled)."""
    with torch.no_grad():
        noise = pipe.unet(**_unet_inputs()).sample
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    return {"noise": noise, "prompt_embeds": embeds, "pooled": pooled}


@pytest.mark.parametrize("standalone", [False, True], ids=["bundled", "standalone"])
def test_files_reload_in_diffusers_as_the_trained_model(trained, tiny, standalone):
    expected = _outputs(trained.pipe)
    pipe = _pipe(tiny)
    before = _outputs(pipe)["noise"]
    embedding = trained.paths["embedding"] if standalone else None
    assert load_pti(pipe, trained.paths["lora"], embedding_path=embedding) == "tok1"
    got = _outputs(pipe)
    assert (got["noise"] - before).abs().max() > 1e-2  # the LoRA does change the UNet
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=0, msg=key)


def test_file_layouts(trained):
    tensors = load_file(trained.paths["lora"])
    bundled = {k: v for k, v in tensors.items() if k.startswith("bundle_emb.")}
    assert bundled.keys() == {"bundle_emb.tok1.clip_l", "bundle_emb.tok1.clip_g"}
    assert torch.equal(bundled["bundle_emb.tok1.clip_l"], trained.vectors[0])
    assert torch.equal(bundled["bundle_emb.tok1.clip_g"], trained.vectors[1])
    names = {k.split(".")[0] for k in tensors if not k.startswith("bundle_emb.")}
    table = sdxl_key_table()
    assert names <= table.names(conv=True)
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)  # kohya's original (sgm) UNet names
    assert len([n for n in names if n.startswith("lora_te1_")]) == 12 and len([n for n in names if n.startswith("lora_te2_")]) == 12
    embedding = load_file(trained.paths["embedding"])
    assert embedding.keys() == {"clip_l", "clip_g"}
    assert embedding["clip_l"].shape == (2, 32) and embedding["clip_g"].shape == (2, 48)
    assert torch.equal(embedding["clip_l"], trained.vectors[0]) and torch.equal(embedding["clip_g"], trained.vectors[1])
    from safetensors import safe_open

    with safe_open(str(trained.paths["lora"]), framework="pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_kohya_round_trip_per_component(trained):
    """kohya -> peft for the three components gives back the trained state dicts and alphas."""
    tensors = peft_to_kohya(trained.lora, trained.alphas, table=sdxl_key_table())
    models = {"unet": trained.pipe.unet, "text_encoder": trained.pipe.text_encoder, "text_encoder_2": trained.pipe.text_encoder_2}
    states, alphas = kohya_to_peft(tensors, models, sdxl_key_table())
    assert states.keys() == trained.lora.keys() and alphas == trained.alphas
    for component, state in trained.lora.items():
        assert states[component].keys() == state.keys()
        assert all(torch.equal(states[component][k], v) for k, v in state.items())


def test_wrong_files_are_refused_before_the_pipeline_changes(trained, tiny, tmp_path):
    pipe = _pipe(tiny)
    tensors = load_file(trained.paths["lora"])
    sd15 = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    sd15["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 32)
    save_file(sd15, tmp_path / "sd15.safetensors")
    with pytest.raises(LoraFormatError, match="lora_te_text_model_encoder_layers_0_mlp_fc1.*SDXL"):
        load_pti(pipe, tmp_path / "sd15.safetensors")
    save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 1280)}, tmp_path / "wide.safetensors")
    with pytest.raises(EmbeddingFormatError, match="clip_g vectors are 1280 wide"):
        load_pti(pipe, trained.paths["lora"], embedding_path=tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.zeros(2, 32)}, tmp_path / "half.safetensors")
    with pytest.raises(EmbeddingFormatError, match="clip_l, clip_g"):
        load_pti(pipe, trained.paths["lora"], embedding_path=tmp_path / "half.safetensors")
    assert not getattr(pipe.unet, "peft_config", None) and "tok1" not in pipe.tokenizer.get_vocab()


def test_inspect_reads_sdxl_files(trained, capsys):
    assert inspect_main([str(trained.paths["lora"]), str(trained.paths["embedding"])]) == 0
    out = capsys.readouterr().out
    assert "format: kohya LoRA (SDXL key map)" in out
    assert "UNet attention 192/722" in out and "text encoder 1 12/72" in out and "text encoder 2 12/192" in out
    assert "tok1 clip_l [2, 32] float32 + clip_g [2, 48] float32" in out and "keys no SDXL module would take: none" in out
    assert "textual-inversion embedding (SDXL clip_l + clip_g)" in out and "clip_l 2 x 32 float32, clip_g 2 x 48 float32" in out
