"""File formats: kohya LoRA + bundled/standalone embedding reload in diffusers, SD1.5 key map, safe loading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pti_plugin.formats import (
    BadSafetensorsError,
    EmbeddingFormatError,
    LoraFormatError,
    UnsafeFileError,
    bundle_embedding_keys,
    check_safetensors,
    from_kohya,
    kohya_metadata,
    load_embedding,
    load_lora,
    safe_torch_load,
    save_embedding,
    save_lora,
    sd15_kohya_lora_names,
    to_kohya,
)
from pti_plugin.safe_load import ModelCheckpointModuleStandIn, ModelCheckpointStandIn
from pti_plugin.inspect import main as inspect_main
from pti_plugin.load_pti import load_pti
from pti_plugin.models.lora import attach_lora, lora_parameters, lora_state_dict
from pti_plugin.models.family import key_table
from pti_plugin.models.tiny import build_tiny_sd

RANK, ALPHA = 4, 2.0

_TRANSFORMER_LEAVES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                       "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def unet_lora_targets(unet):
    """kohya networks.lora's rule applied to a model's structure (independent of the family's key table):
    proj_in, proj_out and the block linears of every Transformer2DModel."""
    targets = []
    for name, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            targets += [f"{name}.proj_in", f"{name}.proj_out"]
            targets += [f"{name}.{b}.{leaf}" for b, block in module.named_modules()
                        if type(block).__name__ == "BasicTransformerBlock" for leaf in _TRANSFORMER_LEAVES]
    return sorted(targets)


def text_encoder_lora_targets(text_encoder):
    """The attention and MLP linears of every CLIP encoder layer (kohya's text-encoder rule)."""
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    return sorted(n for n, _ in text_encoder.named_modules() if ".layers." in n and n.endswith(leaves))
PROMPT = "an anime illustration of tok1"


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """An in-memory 'trained' pipeline (random LoRA on UNet and text encoder, tok1 = 2 vectors) and its files."""
    pipe = _pipe(tiny)
    attach_lora(pipe.unet, unet_lora_targets(pipe.unet), RANK, ALPHA)
    attach_lora(pipe.text_encoder, text_encoder_lora_targets(pipe.text_encoder), RANK, ALPHA)
    gen = torch.Generator().manual_seed(1)
    for model in (pipe.unet, pipe.text_encoder):
        for param in lora_parameters(model):
            param.data = torch.randn(param.shape, generator=gen) * 0.2
    vectors = torch.randn(2, pipe.text_encoder.get_input_embeddings().weight.shape[1], generator=gen)
    # diffusers names the extra vectors of a multi-vector token tok1_1, tok1_2, ...
    pipe.tokenizer.add_tokens(["tok1", "tok1_1"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    ids = pipe.tokenizer.convert_tokens_to_ids(["tok1", "tok1_1"])
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[ids] = vectors

    out = tmp_path_factory.mktemp("out")
    unet_lora, te_lora = lora_state_dict(pipe.unet), lora_state_dict(pipe.text_encoder)
    tensors = to_kohya(unet_lora, te_lora, ALPHA) | bundle_embedding_keys("tok1", vectors)
    meta = kohya_metadata(
        network_dim=RANK, network_alpha=ALPHA, output_name="pti", training_started_at=1700000000.0,
        steps=10, learning_rate=1e-4, tag_frequency={"5_tok1": {"tok1": 3}}, extra={"pti_token": "tok1"},
    )
    save_lora(out / "pti.safetensors", tensors, meta)
    save_embedding(out / "tok1.safetensors", vectors)
    return types.SimpleNamespace(
        pipe=pipe, vectors=vectors, unet_lora=unet_lora, te_lora=te_lora,
        lora=out / "pti.safetensors", embedding=out / "tok1.safetensors", out=out,
    )


def _inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([500])


@torch.no_grad()
def _reference_prediction(trained):
    """The in-memory model: tok1 spelled out as its two tokens, as diffusers expands it."""
    pipe = trained.pipe
    ids = pipe.tokenizer(PROMPT + " tok1_1", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 5] == pipe.tokenizer.convert_tokens_to_ids("tok1")
    cond = pipe.text_encoder(ids)[0]
    x_t, t = _inputs()
    return pipe.unet(x_t, t, encoder_hidden_states=cond).sample


@torch.no_grad()
def _loaded_prediction(pipe, prompt=PROMPT):
    cond, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
    x_t, t = _inputs()
    return pipe.unet(x_t, t, encoder_hidden_states=cond).sample


def test_load_pti_reproduces_in_memory_model(tiny, trained):
    reference = _reference_prediction(trained)
    base = _loaded_prediction(_pipe(tiny), "an anime illustration of girl")
    assert (reference - base).abs().max() > 1e-2  # LoRA and token really change the prediction

    pipe = _pipe(tiny)
    assert load_pti(pipe, trained.lora) == "tok1"
    assert pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer) == PROMPT + " tok1_1"
    assert (_loaded_prediction(pipe) - reference).abs().max() < 1e-4

    renamed = _pipe(tiny)  # a single bundled embedding under another name, e.g. to avoid a clash
    assert load_pti(renamed, trained.lora, token="mytok") == "mytok"
    assert (_loaded_prediction(renamed, "an anime illustration of mytok") - reference).abs().max() < 1e-4


def test_load_pti_refuses_before_changing_pipe(tiny, trained):
    tensors = load_file(trained.lora)
    wide = tensors | bundle_embedding_keys("tok1", torch.zeros(2, 768))
    save_lora(trained.out / "wide.safetensors", wide, {})
    pipe = _pipe(tiny)
    with pytest.raises(EmbeddingFormatError, match="768 wide.*takes 32"):
        load_pti(pipe, trained.out / "wide.safetensors")
    assert not pipe.get_list_adapters()  # nothing half-loaded


@contextlib.contextmanager
def _messages_of(logger_name: str):
    """The messages ``logger_name`` emits inside the ``with`` block (after its filters), as a list."""
    logger, seen = logging.getLogger(logger_name), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def test_load_pti_of_a_unet_only_file_prints_no_text_encoder_notice(tiny, trained):
    """diffusers' "No LoRA keys associated to CLIPTextModel" says nothing for a UNet-only file: load_pti drops it
    while it loads such a file, and only then."""
    import logging

    from pti_plugin.formats.kohya_lora import BUNDLE_PREFIX

    unet_only = {k: v for k, v in load_file(trained.lora).items() if not k.startswith("lora_te")}
    save_lora(trained.out / "unet_only.safetensors", unet_only, {})
    logger = logging.getLogger("diffusers.loaders.lora_base")
    with _messages_of(logger.name) as seen:
        plain = {k: v for k, v in unet_only.items() if not k.startswith(BUNDLE_PREFIX)}
        _pipe(tiny).load_lora_weights(plain)  # diffusers alone prints it
        assert any("No LoRA keys associated to CLIPTextModel" in m for m in seen)
        seen.clear()
        assert load_pti(_pipe(tiny), trained.out / "unet_only.safetensors") == "tok1"
        assert not any("No LoRA keys associated" in m for m in seen)
        logger.warning("No LoRA keys associated to something else")  # the filter left with the call
        assert seen == ["No LoRA keys associated to something else"]


def test_load_pti_prints_no_note_on_how_the_new_token_row_is_initialised(tiny, trained):
    """transformers notes how resize_token_embeddings fills a new row; load_pti overwrites that row with the
    file's vector at once, so it drops the note while it adds the token, and only then."""
    import logging

    import transformers.utils.logging as hf_logging

    logger = logging.getLogger("transformers.modeling_utils")
    with _messages_of(logger.name) as seen:
        hf_logging.warning_once.cache_clear()  # transformers says it once per process
        _pipe(tiny).load_textual_inversion(trained.vectors, token="tok1")  # diffusers alone prints it
        assert any("initialized from a multivariate normal" in m for m in seen)
        seen.clear()
        hf_logging.warning_once.cache_clear()
        assert load_pti(_pipe(tiny), trained.lora) == "tok1"  # the bundled embedding
        assert not any("multivariate normal" in m for m in seen)
        logger.warning("The new embeddings will be initialized from a multivariate normal x")  # the filter left
        assert seen == ["The new embeddings will be initialized from a multivariate normal x"]


def test_plain_diffusers_reproduces_in_memory_model(tiny, trained):
    reference = _reference_prediction(trained)
    pipe = _pipe(tiny)
    state = load_file(trained.lora)
    pipe.load_lora_weights({k: v for k, v in state.items() if not k.startswith("bundle_emb.")})
    pipe.load_textual_inversion(str(trained.embedding), token="tok1")
    assert (_loaded_prediction(pipe) - reference).abs().max() < 1e-4


def test_diffusers_rejects_unfiltered_file(tiny, trained):
    """Why load_pti and the README filter bundle_emb keys: diffusers refuses the whole file."""
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        _pipe(tiny).load_lora_weights(load_file(trained.lora))


def test_embedding_files(trained):
    standalone = load_file(trained.embedding)
    assert list(standalone) == ["emb_params"]
    bundled = load_file(trained.lora)["bundle_emb.tok1.string_to_param.*"]
    assert bundled.dtype == standalone["emb_params"].dtype and torch.equal(bundled, standalone["emb_params"])
    assert torch.equal(load_embedding(trained.lora, token="tok1"), trained.vectors)
    assert torch.equal(load_embedding(trained.embedding, expected_dim=trained.vectors.shape[1]), trained.vectors)


def test_lora_round_trip_and_metadata(trained, tmp_path):
    tensors, meta = load_lora(trained.lora)
    save_lora(tmp_path / "again.safetensors", tensors, meta)
    tensors2, meta2 = load_lora(tmp_path / "again.safetensors")
    assert meta2 == meta and tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) and tensors[k].dtype == tensors2[k].dtype for k in tensors)

    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == ALPHA
    assert json.loads(meta["ss_tag_frequency"]) == {"5_tok1": {"tok1": 3}} and meta["pti_token"] == "tok1"
    locon = kohya_metadata(network_dim=4, network_alpha=1, output_name="x", training_started_at=0, steps=1,
                           learning_rate=1, conv_dim=8, conv_alpha=2)
    assert json.loads(locon["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "2.0"}
    with pytest.raises(ValueError, match="ss_steps"):
        save_lora(tmp_path / "x.safetensors", tensors, {"ss_steps": 10})
    data = trained.lora.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()

    unet_lora, te_lora, alphas = from_kohya(tensors, trained.pipe.unet, trained.pipe.text_encoder)
    assert unet_lora.keys() == trained.unet_lora.keys() and te_lora.keys() == trained.te_lora.keys()
    assert all(torch.equal(unet_lora[k], trained.unet_lora[k]) for k in unet_lora)
    assert set(alphas.values()) == {ALPHA} and len(alphas) == 192 + 18


def test_to_kohya_names_and_dtypes(trained):
    tensors = to_kohya(trained.unet_lora, trained.te_lora, ALPHA, dtype=torch.float16)
    names = {k.split(".")[0] for k in tensors}
    tiny_te = {n for n in sd15_kohya_lora_names() if re.match(r"lora_te_text_model_encoder_layers_[0-2]_", n)}
    assert names == sd15_kohya_lora_names(text_encoder=False) | tiny_te
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    alpha = tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]
    assert alpha.dim() == 0 and alpha.item() == ALPHA
    # older transformers (text_model. prefix) give the same names
    prefixed = {f"text_model.{k}": v for k, v in trained.te_lora.items()}
    assert to_kohya({}, prefixed, ALPHA).keys() == to_kohya({}, trained.te_lora, ALPHA).keys()
    with pytest.raises(LoraFormatError, match="conv_in"):
        to_kohya({"conv_in.lora_A.weight": torch.zeros(1), "conv_in.lora_B.weight": torch.zeros(1)}, {}, 1.0)


def test_from_kohya_foreign_and_bad_keys(trained):
    tensors, _ = load_lora(trained.lora)
    foreign = {k: v.half() for k, v in tensors.items() if not k.endswith(".alpha") and not k.startswith("bundle_emb.")}
    _, te_lora, alphas = from_kohya(foreign)
    assert set(alphas.values()) == {float(RANK)}  # no alpha stored: kohya's default alpha = rank
    assert te_lora.keys() == trained.te_lora.keys()  # no model given: the installed transformers' path form
    for bad in ("lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight", "model.diffusion_model.out.0.weight",
                "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"):
        with pytest.raises(LoraFormatError, match=bad.replace("*", r"\*")):
            from_kohya(tensors | {bad: torch.zeros(1)})
    te12 = {"lora_te_text_model_encoder_layers_11_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
            "lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="layers.11"):
        from_kohya(te12, text_encoder=trained.pipe.text_encoder)
    with pytest.raises(LoraFormatError, match="foo"):
        save_lora(trained.out / "bad.safetensors", tensors | {"foo": torch.zeros(1)}, {})
    assert not (trained.out / "bad.safetensors").exists()


def _sd15_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32, act_fn="silu", downsample_padding=1, flip_sin_to_cos=True,
            freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        ))
    return unet, text_encoder


def _kohya_conv_targets(unet):
    """kohya's LoCon rule, applied to the real model: every Conv2d/Linear inside a ResNet or down/upsampler."""
    owners = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
    return [
        f"{name}.{child}" for name, module in unet.named_modules() if type(module).__name__ in owners
        for child, leaf in module.named_modules() if isinstance(leaf, (torch.nn.Conv2d, torch.nn.Linear))
    ]


def test_key_map_against_sd15_architecture():
    """Names from the real SD1.5 structure equal the fixed map; diffusers consumes every key, no warning."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    assert len(sd15_kohya_lora_names(text_encoder=False)) == 192 and len(sd15_kohya_lora_names()) == 192 + 72
    assert len(sd15_kohya_lora_names(text_encoder=False, conv=True)) == 192 + 86
    unet, text_encoder = _sd15_models()
    table = key_table("sd15")  # the family's table picks exactly what kohya's rules pick on the real architecture
    assert table.peft_targets("unet", unet) == unet_lora_targets(unet)
    assert sorted(table.peft_targets("unet", unet, conv=True)) == sorted(_kohya_conv_targets(unet))
    assert table.peft_targets("text_encoder", text_encoder) == text_encoder_lora_targets(text_encoder)
    attach_lora(unet, unet_lora_targets(unet), RANK, 1.0)
    attach_lora(text_encoder, text_encoder_lora_targets(text_encoder), RANK, 1.0)
    exported = to_kohya(lora_state_dict(unet), lora_state_dict(text_encoder), 1.0)
    assert {k.split(".")[0] for k in exported} == sd15_kohya_lora_names()

    unet, _ = _sd15_models()
    attach_lora(unet, unet_lora_targets(unet) + _kohya_conv_targets(unet), RANK, 1.0)
    exported |= to_kohya(lora_state_dict(unet), {}, 1.0)
    assert {k.split(".")[0] for k in exported} == sd15_kohya_lora_names(conv=True)

    gen = torch.Generator().manual_seed(0)
    real = {k: torch.randn(v.shape, generator=gen) if v.dim() else torch.tensor(1.0) for k, v in exported.items()}
    unet, text_encoder = (m.to_empty(device="cpu") for m in _sd15_models())  # uninitialised: only names/shapes matter
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(dict(real))
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, low_cpu_mem_usage=True)
        StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=text_encoder, low_cpu_mem_usage=True)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    loaded = 0
    for prefix, model in (("lora_unet_", unet), ("lora_te_text_model_", text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                key = prefix + name.removeprefix("text_model.").replace(".", "_")
                assert torch.equal(module.lora_A["default_0"].weight, real[f"{key}.lora_down.weight"])
                assert torch.equal(module.lora_B["default_0"].weight, real[f"{key}.lora_up.weight"])
                loaded += 1
    assert loaded == 192 + 86 + 72


def test_inspect(trained, tmp_path, capsys):
    assert inspect_main([str(trained.lora)]) == 0
    out = capsys.readouterr().out
    assert "UNet attention 192/192" in out and "text encoder 18/72" in out and "rank: 4" in out and "alpha: 2.0" in out
    assert "tok1 [2, 32] float32" in out and "ss_network_module: networks.lora" in out
    tensors = load_file(trained.lora)
    bad = tensors | {"lora_unet_conv_in.lora_down.weight": torch.zeros(1), "text_model.x": torch.zeros(1)}
    save_file(bad, tmp_path / "bad.safetensors")
    assert inspect_main([str(tmp_path / "bad.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "keys no SD1.5 module would take: 2" in out and "lora_unet_conv_in.lora_down.weight" in out
    result = subprocess.run(
        [sys.executable, "-m", "pti_plugin.inspect", str(trained.embedding)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and "standalone emb_params" in result.stdout and "vectors: 2 x 32" in result.stdout


# --- reading others' embeddings and untrusted pickles -------------------------------------------


def test_foreign_embeddings(tmp_path):
    vectors = torch.randn(3, 32)
    torch.save({"string_to_token": {"*": 265}, "name": "old", "step": 100,
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})}, tmp_path / "old.pt")
    torch.save({"tok2": vectors[0]}, tmp_path / "learned_embeds.bin")
    save_file({"bundle_emb.tok2.clip_l": vectors, "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)},
              tmp_path / "onetrainer.safetensors")
    save_file({"string_to_param.*": vectors}, tmp_path / "a1111.safetensors")
    assert torch.equal(load_embedding(tmp_path / "old.pt", expected_dim=32), vectors)
    assert torch.equal(load_embedding(tmp_path / "learned_embeds.bin"), vectors[:1])
    assert torch.equal(load_embedding(tmp_path / "onetrainer.safetensors", token="tok2"), vectors)
    assert torch.equal(load_embedding(tmp_path / "a1111.safetensors"), vectors)
    save_embedding(tmp_path / "sd2.safetensors", torch.zeros(1, 1024))
    with pytest.raises(EmbeddingFormatError, match=r"sd2\.safetensors.*1024 wide.*SD2.*takes 768"):
        load_embedding(tmp_path / "sd2.safetensors", expected_dim=768)


def _fake_lightning(monkeypatch):
    """Make ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` importable for pickling only."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    class ModuleReference:  # pickles as a reference to the module object, as some checkpoints hold
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    ModuleReference.__module__, ModuleReference.__qualname__ = "pytorch_lightning.callbacks", "model_checkpoint"
    module.ModelCheckpoint = ModelCheckpoint
    callbacks = types.ModuleType("pytorch_lightning.callbacks")
    callbacks.model_checkpoint = ModuleReference
    monkeypatch.setitem(sys.modules, "pytorch_lightning", types.ModuleType("pytorch_lightning"))
    monkeypatch.setitem(sys.modules, callbacks.__name__, callbacks)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return ModelCheckpoint, ModuleReference


def test_safe_load_accepts_legitimate_files(tmp_path, monkeypatch):
    cls, module_reference = _fake_lightning(monkeypatch)
    callback = cls()
    callback.best_model_score = torch.tensor(0.5)
    weights = torch.randn(4, 4)
    torch.save({"state_dict": {"model.w": weights}, "callbacks": {cls: {"monitor": None}}, "callback": callback,
                "callback_module": module_reference,
                "global_step": np.int64(470000), "epoch": np.float64(6.0), "hist": np.arange(3.0)}, tmp_path / "sd.ckpt")
    monkeypatch.undo()  # Lightning is gone again: the loader must not need it
    assert "pytorch_lightning" not in sys.modules
    data = safe_torch_load(tmp_path / "sd.ckpt")
    assert torch.equal(data["state_dict"]["model.w"], weights)
    assert data["callbacks"] == {ModelCheckpointStandIn: {"monitor": None}}
    assert isinstance(data["callback"], ModelCheckpointStandIn) and data["callback"].best_model_score.item() == 0.5
    assert data["callback_module"] is ModelCheckpointModuleStandIn
    assert data["global_step"] == 470000 and data["epoch"] == 6.0 and np.array_equal(data["hist"], np.arange(3.0))


class _Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): code running from a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("zip", "call io.open"), ("legacy", "call io.open"), ("raw_pickle_2", "call io.open"), ("raw_pickle_4", "instructions")],
)
def test_safe_load_refuses_code_and_never_runs_it(tmp_path, kind, reason):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(str(live))))
    assert live.exists()  # the payload is real: a plain unpickler runs it

    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    obj = {"string_to_param": {"*": torch.zeros(1, 32)}, "x": _Payload(str(marker))}
    if kind.startswith("raw_pickle"):  # no tensors: plain pickle would store them through another global
        path.write_bytes(pickle.dumps({"x": obj["x"]}, protocol=int(kind[-1])))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(UnsafeFileError, match=rf"evil\.pt: .*{reason}.*nothing from the file was run.*safetensors"):
        safe_torch_load(path)
    with pytest.raises(UnsafeFileError):
        load_embedding(path)
    assert not marker.exists()


def test_check_safetensors_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_embedding(good, torch.randn(2, 32))
    data = good.read_bytes()
    assert "emb_params" in check_safetensors(good)
    cases = {
        "truncated": (data[:-10], "truncated"),
        "tiny": (data[:3], "truncated"),
        "long_header": (struct.pack("<Q", 10**9) + data[8:], "header length 1000000000 exceeds"),
        "not_json": (struct.pack("<Q", 8) + b"not json" + b"\0" * 16, "not valid JSON"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(BadSafetensorsError, match=rf"{name}\.safetensors.*{message}"):
            check_safetensors(path)
    with pytest.raises(BadSafetensorsError, match="truncated"):
        load_embedding(tmp_path / "truncated.safetensors")
