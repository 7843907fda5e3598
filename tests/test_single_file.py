"""Single-file SD1.x checkpoints: offline loading through diffusers' single-file machinery.

The tiny diffusers model is converted here to the ORIGINAL single-file layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), written independently of
diffusers' own conversion tables (it is their reverse), saved as ``.safetensors`` and as a Lightning-style
``.ckpt``; loading it back must reproduce the diffusers-folder model exactly.
"""

from __future__ import annotations

import gzip
import json
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pti_plugin.config import ConfigError
from pti_plugin.safe_load import UnsafeFileError
from pti_plugin.models import single_file
from pti_plugin.models.single_file import (
    CLIP_NUM_MERGES,
    CLIP_REPO,
    CLIP_VOCAB_SIZE,
    SD15_CONFIG_DIR,
    bytes_to_unicode,
    clip_vocab_from_bpe,
    load_clip_tokenizer,
    load_single_file,
    write_clip_tokenizer_files,
)

# --------------------------------------------------------------------------------------------------
# diffusers -> original (LDM) layout, for the SD1.5 block structure (the reverse of diffusers' conversion)

_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, table: dict[str, str]) -> str:
    head, tail = rest.split(".", 1)
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    n = layers_per_block + 1  # original blocks per level (down: L layers + a downsampler; up: L+1 layers)
    attn_up_blocks = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if ".".join(p[:-1]) in top:
            new = f"{top['.'.join(p[:-1])]}.{p[-1]}"
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            rest = ".".join(p[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * n + int(p[3])}.0.{_rename_first(rest, _RESNET_UNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * n + int(p[3])}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(b + 1) * n}.0.op.{'.'.join(p[5:])}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            if p[1] == "resnets":
                new = f"middle_block.{2 * int(p[2])}.{_rename_first(rest, _RESNET_UNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            rest = ".".join(p[4:])
            if kind == "resnets":
                new = f"output_blocks.{b * n + int(p[3])}.0.{_rename_first(rest, _RESNET_UNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * n + int(p[3])}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the attention when the level has one
                slot = 2 if b in attn_up_blocks else 1
                new = f"output_blocks.{b * n + n - 1}.{slot}.conv.{'.'.join(p[5:])}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = key
        elif p[1] in ("conv_in", "conv_out"):
            new = key
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[2]}"
        elif p[1] in ("down_blocks", "up_blocks"):
            level = int(p[2]) if p[1] == "down_blocks" else num_blocks - 1 - int(p[2])
            group = "down" if p[1] == "down_blocks" else "up"
            if p[3] == "resnets":
                new = f"{p[0]}.{group}.{level}.block.{p[4]}.{'.'.join(p[5:]).replace('conv_shortcut', 'nin_shortcut')}"
            else:  # downsamplers/upsamplers.0.conv.*
                new = f"{p[0]}.{group}.{level}.{'downsample' if group == 'down' else 'upsample'}.conv.{p[-1]}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
            else:  # attentions.0.<name>.<weight|bias>; the original uses 1x1 convolutions
                name = ".".join(p[4:-1])
                new = f"{p[0]}.mid.attn_1.{_VAE_ATTN[name]}.{p[-1]}"
                if name != "group_norm" and p[-1] == "weight":
                    value = value[:, :, None, None]
        else:
            raise AssertionError(f"unmapped VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("text_model.")  # transformers < 5.6 wraps the model in `text_model`
        out["cond_stage_model.transformer.text_model." + key] = value
    positions = sd.get("embeddings.position_embedding.weight", sd.get("text_model.embeddings.position_embedding.weight"))
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions.shape[0])[None]
    return out


def to_original_layout(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The three components' weights in the original single-file layout, with the extras real files carry."""
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config.layers_per_block))
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.down_block_types)))
    state.update(clip_to_ldm(text_encoder.state_dict()))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(840000, dtype=torch.int32)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# Fixtures


def _load_folder(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kwargs = {"local_files_only": True}
    return (
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs).eval(),
        AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs).eval(),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kwargs).eval(),
    )


@pytest.fixture(scope="module")
def reference(tiny_model):
    return _load_folder(tiny_model)


@pytest.fixture(scope="module")
def original_state(reference):
    return to_original_layout(*reference)


@pytest.fixture(scope="module")
def safetensors_file(original_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors"
    save_file(original_state, str(path), metadata={"format": "pt"})
    return path


def _fake_lightning_modules(monkeypatch):
    """Put a stand-in ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` where pickle finds it."""
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = [types.ModuleType(name) for name in names]
    modules[-1].ModelCheckpoint = ModelCheckpoint
    modules[0].callbacks, modules[1].model_checkpoint = modules[1], modules[2]
    for name, module in zip(names, modules):
        monkeypatch.setitem(sys.modules, name, module)
    return ModelCheckpoint


@pytest.fixture(scope="module")
def ckpt_file(original_state, tmp_path_factory) -> Path:
    """A Lightning-style .ckpt as original SD ships (pytorch-lightning 1.4 keys the callbacks dict by the
    ModelCheckpoint class), plus a ModelCheckpoint object as later Lightning versions pickle."""
    path = tmp_path_factory.mktemp("single") / "tiny-sd15.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        ModelCheckpoint = _fake_lightning_modules(mp)
        callback = ModelCheckpoint()
        callback.monitor, callback.best_model_path = None, ""
        torch.save(
            {
                "epoch": 6,
                "global_step": 840000,
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"best_model_score": None, "best_model_path": "", "dirpath": "/logs"}},
                "loops": {"checkpoint_callback": callback},
                "state_dict": original_state,
            },
            path,
        )
    assert "pytorch_lightning" not in sys.modules
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Records every torch.load call's weights_only flag (all must be True)."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.fixture
def empty_places(monkeypatch, tmp_path):
    """No HF cache entry for CLIP and no open_clip_torch distribution."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(single_file, "OPEN_CLIP_DISTRIBUTION", "open_clip_torch_not_installed_for_this_test")


# --------------------------------------------------------------------------------------------------
# Equality of the loaded model with the diffusers folder


def _assert_same_outputs(loaded, reference_models):
    unet, vae, text_encoder = loaded
    ref_unet, ref_vae, ref_text = reference_models
    assert set(unet.state_dict()) == set(ref_unet.state_dict())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref_text.config.vocab_size, (2, 77), generator=gen)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        hidden, ref_hidden = text_encoder(ids).last_hidden_state, ref_text(ids).last_hidden_state
        assert (hidden - ref_hidden).abs().max() < 1e-5
        eps = unet(latents, timesteps, encoder_hidden_states=ref_hidden).sample
        ref_eps = ref_unet(latents, timesteps, encoder_hidden_states=ref_hidden).sample
        assert (eps - ref_eps).abs().max() < 1e-5
        moments = vae.encode(images).latent_dist.mean
        ref_moments = ref_vae.encode(images).latent_dist.mean
        assert (moments - ref_moments).abs().max() < 1e-5
        assert (vae.decode(latents).sample - ref_vae.decode(latents).sample).abs().max() < 1e-5
    for module in loaded:
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())
    assert vae.config.scaling_factor == ref_vae.config.scaling_factor


@pytest.mark.parametrize("which", ["safetensors", "ckpt"])
def test_single_file_matches_diffusers_folder(
    which, request, tiny_model, reference, no_network, torch_load_calls
):
    path = request.getfixturevalue(f"{which}_file")
    unet, vae, text_encoder, tokenizer, scheduler = load_single_file(
        path, config_dir=tiny_model, tokenizer_path=str(tiny_model / "tokenizer")
    )
    _assert_same_outputs((unet, vae, text_encoder), reference)
    assert tokenizer("an anime illustration of red hair").input_ids == _ref_tokenizer(tiny_model)(
        "an anime illustration of red hair"
    ).input_ids
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert all(flag is True for flag in torch_load_calls)
    assert len(torch_load_calls) == (1 if which == "ckpt" else 0)
    assert "pytorch_lightning" not in sys.modules


def _ref_tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer"), local_files_only=True)


def test_original_layout_has_the_real_sd15_names(original_state):
    """Spot checks that the test's original layout is the real one (names from SD1.5 files)."""
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.norm_out.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    ):
        assert key in original_state, key
    assert original_state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    # SD1.5's UNet has 686 tensors; the tiny model keeps its block structure but all its widths are
    # equal, so it lacks the two down-path skip_connection convs (input_blocks.4.0, input_blocks.7.0).
    assert "model.diffusion_model.input_blocks.4.0.skip_connection.weight" not in original_state
    assert sum(k.startswith("model.diffusion_model.") for k in original_state) == 686 - 4


def test_fp16_file_with_v_pred_marker(original_state, tiny_model, reference, tmp_path):
    """An fp16 file loads as float32; the ``v_pred``/``ztsnr`` marker keys select the scheduler's mode."""
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in original_state.items()}
    path = tmp_path / "vpred-fp16.safetensors"
    save_file({**half, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(path))
    unet, vae, text_encoder, _, scheduler = load_single_file(path, config_dir=tiny_model, tokenizer_path=str(tiny_model))
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is True
    for module, ref in zip((unet, vae, text_encoder), reference):
        for (name, p), (_, q) in zip(module.state_dict().items(), ref.state_dict().items()):
            assert p.dtype == q.dtype, name
            assert torch.equal(p, q.half().to(q.dtype)), name


# --------------------------------------------------------------------------------------------------
# Refusals


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_code_running_ckpt_is_refused_and_never_runs(original_state, tiny_model, tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.ckpt"
    small = {k: v for k, v in list(original_state.items())[:3]}
    torch.save({"state_dict": small, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeFileError, match="evil.ckpt"):
        load_single_file(path, config_dir=tiny_model, tokenizer_path=str(tiny_model / "tokenizer"))
    assert not marker.exists()


def test_missing_tokenizer_lists_the_three_places(safetensors_file, empty_places, no_network):
    with pytest.raises(ConfigError) as info:
        load_single_file(safetensors_file)
    message = str(info.value)
    assert "tokenizer_path" in message
    assert CLIP_REPO in message and "empty-hf-cache" in message
    assert "open_clip_torch" in message and "bpe_simple_vocab_16e6.txt.gz" in message


def test_tokenizer_path_with_only_vocab_and_merges(tiny_model, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_model / "tokenizer" / name).read_bytes())
    tokenizer = load_clip_tokenizer(str(tmp_path))
    text = "an anime illustration of red hair"
    assert tokenizer(text).input_ids == _ref_tokenizer(tiny_model)(text).input_ids
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"


def test_unusable_tokenizer_path_is_an_error_naming_it(safetensors_file, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="nowhere.*vocab.json"):
        load_single_file(safetensors_file, config_dir=tiny_model, tokenizer_path=str(tmp_path / "nowhere"))


def test_other_families_and_incomplete_files_are_refused(original_state, tiny_model, tmp_path):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}, str(sdxl))
    with pytest.raises(ConfigError, match="sdxl.safetensors.*SDXL"):
        load_single_file(sdxl, config_dir=tiny_model, tokenizer_path=str(tiny_model))
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in original_state.items() if not k.startswith("first_stage_model.")}, str(no_vae))
    with pytest.raises(ConfigError, match=r"no_vae.safetensors.*VAE \(first_stage_model"):
        load_single_file(no_vae, config_dir=tiny_model, tokenizer_path=str(tiny_model))
    partial = tmp_path / "partial.safetensors"
    dropped = "model.diffusion_model.middle_block.1.proj_out.weight"
    save_file({k: v for k, v in original_state.items() if k != dropped}, str(partial))
    with pytest.raises(ConfigError, match="partial.safetensors.*UNet.*mid_block.attentions.0.proj_out.weight"):
        load_single_file(partial, config_dir=tiny_model, tokenizer_path=str(tiny_model))
    partial_clip = tmp_path / "partial_clip.safetensors"
    dropped = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    save_file({k: v for k, v in original_state.items() if k != dropped}, str(partial_clip))
    with pytest.raises(ConfigError, match="partial_clip.safetensors.*text encoder.*final_layer_norm.weight"):
        load_single_file(partial_clip, config_dir=tiny_model, tokenizer_path=str(tiny_model))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sdxl.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_single_file(truncated, config_dir=tiny_model, tokenizer_path=str(tiny_model))


def test_wrong_width_config_is_a_clear_error(safetensors_file, tiny_model):
    """The shipped SD1.5 configs do not fit the tiny file: the error names the file and the component."""
    with pytest.raises(ConfigError, match="tiny-sd15.safetensors.*UNet.*sd15"):
        load_single_file(safetensors_file, tokenizer_path=str(tiny_model))


# --------------------------------------------------------------------------------------------------
# Tokenizer sources


def _fake_bpe(path: Path) -> Path:
    """A BPE file shaped like CLIP's: a header, 48894 usable merges (hello -> one token), then extra lines."""
    symbols = list(bytes_to_unicode().values())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>")]
    taken = {"".join(m) for m in merges}
    for a in symbols:
        for b in symbols:
            if len(merges) == CLIP_NUM_MERGES:
                break
            if a + b not in taken:
                merges.append((a, b))
    lines = ["bpe_simple_vocab_16e6.txt#version: 0.2"] + [f"{a} {b}" for a, b in merges] + ["x y", "y z"]
    with gzip.open(path, "wb") as handle:
        handle.write("\n".join(lines).encode("utf-8"))
    return path


def test_open_clip_bpe_rebuild_through_package_metadata(monkeypatch, tmp_path, empty_places):
    site = tmp_path / "site"
    (site / "open_clip").mkdir(parents=True)
    _fake_bpe(site / "open_clip" / "bpe_simple_vocab_16e6.txt.gz")
    dist_info = site / "open_clip_torch-9.9.9.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: open_clip_torch\nVersion: 9.9.9\n")
    (dist_info / "RECORD").write_text("open_clip/bpe_simple_vocab_16e6.txt.gz,,\nopen_clip/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(single_file, "OPEN_CLIP_DISTRIBUTION", "open_clip_torch")

    tokenizer = load_clip_tokenizer("")
    assert "open_clip" not in sys.modules  # found through metadata, never imported
    vocab = tokenizer.get_vocab()
    assert len(vocab) == CLIP_VOCAB_SIZE
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["he"] == 512 and vocab["hello</w>"] == 515
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert tokenizer("Hello").input_ids == [49406, 515, 49407]
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"

    # The rebuilt files are Hugging Face's CLIP format and load to the same tokenizer.
    from transformers import CLIPTokenizer

    bpe = site / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    out = write_clip_tokenizer_files(bpe, tmp_path / "tok")
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == clip_vocab_from_bpe(bpe)[0] == vocab
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1:5] == ["h e", "l l", "he ll", "hell o</w>"]
    assert len(merges) == 1 + CLIP_NUM_MERGES
    assert CLIPTokenizer.from_pretrained(str(out), local_files_only=True)("hello hello").input_ids == [49406, 515, 515, 49407]


def test_hf_cache_tokenizer_is_found_offline(monkeypatch, tmp_path, tiny_model, empty_places, no_network):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    repo = cache / ("models--" + CLIP_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("vocab.json", "merges.txt"):
        (snapshot / name).write_bytes((tiny_model / "tokenizer" / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    tokenizer = load_clip_tokenizer("")
    text = "an anime illustration of red hair"
    assert tokenizer(text).input_ids == _ref_tokenizer(tiny_model)(text).input_ids
    assert tokenizer.model_max_length == 77


def test_rebuild_rejects_a_short_bpe_file(tmp_path):
    path = tmp_path / "short.txt.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"header\na b\n")
    with pytest.raises(ValueError, match="short.txt.gz.*48894"):
        clip_vocab_from_bpe(path)


# --------------------------------------------------------------------------------------------------
# The shipped SD1.5 configs


def test_shipped_sd15_configs_build_sd15_sized_components():
    """Built on the meta device (no memory), the shipped configs give SD1.5's published parameter counts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder", local_files_only=True))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480
    assert len(unet.state_dict()) == 686
    scheduler = DDPMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler", local_files_only=True)
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    index = json.loads((SD15_CONFIG_DIR / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_trainer_runs_on_a_single_file_checkpoint(safetensors_file, tiny_model, preset):
    """The trainer takes a single file as pretrained_model_name_or_path (configs: the tiny model's folder)."""
    from safetensors.torch import load_file as load_tensors

    from pti_plugin.config_loading import build_config
    from pti_plugin.trainer import Trainer

    config = build_config(preset(
        pretrained_model_name_or_path=str(safetensors_file), single_file_config=str(tiny_model),
        tokenizer_path=str(tiny_model / "tokenizer"), stages=[{"kind": "inversion", "steps": 1}, {"kind": "lora", "steps": 1}],
    ))
    outputs = Trainer(config).run()
    assert len({k.rsplit(".", 2)[0] for k in load_tensors(outputs["lora"]) if k.startswith("lora_unet_")}) == 192
