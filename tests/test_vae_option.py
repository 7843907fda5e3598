"""``vae`` (kohya's ``--vae``): another VAE replaces the model's for the latents and the samples.

The replacement is a tiny VAE with other weights than the tiny models', saved here as a diffusers folder, a model
folder's ``vae/``, a diffusers-named single file and original-layout (LDM) single files whose key names come from a
map written in this file (independent of the loader). Expectations come from the VAE itself: diffusers'
``AutoencoderKL`` encoding the image, not the code under test.
"""

from __future__ import annotations

import logging
import re
import tomllib

import pytest
import torch
from safetensors.torch import save_file

from pti_plugin.config import ConfigError, load_preset_dict
from pti_plugin.config_loading import build_config, load_config
from pti_plugin.data.latents import LatentSource, load_pixels
from pti_plugin.data.sample_order import sample_generator
from pti_plugin.models.loading import load_base_model
from pti_plugin.models.tiny import tiny_vae
from pti_plugin.resolution import resolved_dict


def _other_vae(**config):
    """A tiny VAE of the tiny models' architecture with other weights (its own seed)."""
    torch.manual_seed(1234)
    return tiny_vae(**config).eval()


def _ldm_name(key: str, up_blocks: int) -> str:
    """diffusers' VAE key -> the original (LDM) layout of A1111's VAE files, written out here."""
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    up = re.match(r"^decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)$", key)
    if up:
        part = f"block.{up[2]}" if up[2] is not None else "upsample"
        key = f"decoder.up.{up_blocks - 1 - int(up[1])}.{part}.{up[3]}"
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", key)
    for old, new in ((".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
                     (".to_out.0.", ".proj_out."), (".conv_norm_out.", ".norm_out."), (".conv_shortcut.", ".nin_shortcut.")):
        key = key.replace(old, new)
    return key


def _ldm_state(vae) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in vae.state_dict().items():
        name = _ldm_name(key, len(vae.config.up_block_types))
        if ".mid.attn_1." in name and name.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original attention is 1x1 convolutions
        state[name] = tensor.contiguous()
    return state


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    """The other VAE in every accepted form, and the VAE itself."""
    root = tmp_path_factory.mktemp("vaes")
    vae = _other_vae()
    vae.save_pretrained(root / "folder")
    vae.save_pretrained(root / "model_like" / "vae")
    ldm = _ldm_state(vae)
    assert {"encoder.down.0.block.0.conv1.weight", "encoder.down.0.downsample.conv.weight", "encoder.mid.block_2.conv2.bias",
            "decoder.up.1.block.1.conv1.weight", "decoder.up.1.upsample.conv.weight",
            "encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.weight"} <= set(ldm)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1) and not any("_blocks." in k for k in ldm)
    save_file(ldm, str(root / "ldm.safetensors"))
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in ldm.items()}}, root / "ldm_prefixed.ckpt")
    others = {"model.diffusion_model.conv_in.weight": torch.zeros(32, 4, 3, 3),
              "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(32)}
    save_file({"first_stage_model." + k: v for k, v in ldm.items()} | others, str(root / "whole.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "diffusers.safetensors"))
    return root, vae


def _expected_latent(vae, scaling_factor: float, item, index: int, seed: int) -> torch.Tensor:
    """The posterior draw of ``vae`` (diffusers' own encode) for an image, seeded as the run seeds it."""
    with torch.no_grad():
        posterior = vae.encode(load_pixels(item, False)[None]).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=sample_generator(seed, 0x1A7E, index, 0))
    return ((posterior.mean + posterior.std * noise)[0] * scaling_factor).float()


def _items(folder):
    from pti_plugin.data.dataset import load_subsets
    from pti_plugin.data.scanning import scan_images

    config = build_config({"train_data_dir": str(folder), "resolution": 32})
    return scan_images(config, load_subsets(config))


@pytest.mark.parametrize("form", ["folder", "model_like", "ldm.safetensors", "ldm_prefixed.ckpt", "whole.safetensors",
                                  "diffusers.safetensors"])
def test_every_form_replaces_the_models_vae(tiny_model, tiny_dataset, vae_files, form):
    root, reference = vae_files
    base = load_base_model(str(tiny_model), vae=str(root / form))
    state, expected = base.vae.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert base.vae.config.scaling_factor == 0.18215 and str(root / form) in base.source
    items = _items(tiny_dataset)
    source = LatentSource(base.vae, items, seed=5, cache=True, to_disk=False)
    source.fill_cache()
    own = load_base_model(str(tiny_model)).vae
    for index, item in enumerate(items):
        want = _expected_latent(reference, 0.18215, item, index, 5)
        assert torch.allclose(source.latent(index, False), want, atol=1e-5)
        assert not torch.allclose(_expected_latent(own, 0.18215, item, index, 5), want, atol=1e-2)


def test_sdxl_keeps_its_scaling_factor(tiny_sdxl, tiny_dataset, vae_files, caplog):
    root, reference = vae_files  # saved with SD1.5's scaling_factor 0.18215
    for form in ("ldm.safetensors", "folder"):
        with caplog.at_level(logging.WARNING):
            base = load_base_model(str(tiny_sdxl), vae=str(root / form))
        assert base.family.name == "sdxl" and base.vae.config.scaling_factor == 0.13025 and base.vae.config.force_upcast
        item = _items(tiny_dataset)[0]
        latent = LatentSource(base.vae, [item], seed=0, cache=False, to_disk=False).latent(0, False)
        assert torch.allclose(latent, _expected_latent(reference, 0.13025, item, 0, 0), atol=1e-5)
    assert "scaling_factor 0.18215 differs from the model's 0.13025" in caplog.text  # the folder's, warned about


def _refused(preset, value) -> str:
    with pytest.raises(ConfigError) as caught:
        build_config(preset(vae=str(value)))
    assert caught.value.key == "vae" and "'vae'" in str(caught.value)
    return str(caught.value)


def test_a_wrong_vae_is_refused_at_start_naming_the_key(preset, tiny_model, vae_files, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root, _ = vae_files
    assert "path not found" in _refused(preset, tmp_path / "missing.safetensors")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", local_files_only=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    assert "not a VAE" in _refused(preset, tmp_path / "unet.safetensors")
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "ldm_unet.safetensors"))
    assert "a UNet's weights" in _refused(preset, tmp_path / "ldm_unet.safetensors")
    torch.manual_seed(0)
    eight = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(16, 16), latent_channels=8, norm_num_groups=8)
    save_file(_ldm_state(eight), str(tmp_path / "eight.safetensors"))
    assert "latents have 8 channels, the model's 4" in _refused(preset, tmp_path / "eight.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((root / "ldm.safetensors").read_bytes()[:2000])
    assert "truncated" in _refused(preset, truncated)
    (tmp_path / "notes.txt").write_text("a VAE?")
    assert "unknown file type" in _refused(preset, tmp_path / "notes.txt")
    assert "not a VAE (AutoencoderKL)" in _refused(preset, tiny_model / "unet")
    wider = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8)
    wider.save_pretrained(tmp_path / "wider")
    assert "another VAE architecture" in _refused(preset, tmp_path / "wider")


def test_a_pickle_that_is_not_a_vae_is_refused_as_the_model_loads(tiny_model, tmp_path):
    torch.save({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "unet.ckpt")
    with pytest.raises(ConfigError) as caught:
        load_base_model(str(tiny_model), vae=str(tmp_path / "unet.ckpt"))
    assert caught.value.key == "vae" and "not a VAE" in str(caught.value)


def test_disk_cache_recomputes_for_another_vae(preset, tiny_dataset, vae_files, tmp_path, capsys):
    import shutil

    from pti_plugin.trainer import Trainer

    root, reference = vae_files
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)  # the cache is written beside the images
    raw = preset(train_data_dir=str(data), cache_latents_to_disk=True, seed=9,
                 stages=[{"kind": "inversion", "steps": 1}, {"kind": "lora", "steps": 1}])
    before = LatentSource(load_base_model(raw["pretrained_model_name_or_path"]).vae, _items(data), 9, True, True)
    before.fill_cache()  # what a run on the model's own VAE caches
    files = sorted(data.rglob("*.pti_latents.safetensors"))
    assert files
    after = Trainer(build_config(raw | {"output_dir": str(tmp_path / "b"), "vae": str(root / "ldm.safetensors")}))
    after.run()
    out = capsys.readouterr().out  # named at start, and mapped from a file on a CPU like the model's own VAE
    assert f"with the VAE {root / 'ldm.safetensors'}" in out and "VAE weights (" in out
    assert len(sorted(data.rglob("*.pti_latents.safetensors"))) == 2 * len(files)  # its own files, none reused
    written = tomllib.loads((tmp_path / "b" / "pti.config.toml").read_text())  # the resolved config resume reads
    assert written["vae"] == str(root / "ldm.safetensors")
    for index, item in enumerate(after.items):
        if item.num_repeats < 1:
            continue
        want = _expected_latent(reference, 0.18215, item, index, 9)
        assert torch.allclose(after.latents.latent(index, False), want, atol=1e-5)
        assert not torch.allclose(before.latent(index, False), want, atol=1e-2)


def test_the_same_vae_under_another_scaling_factor_never_reuses_cached_latents(tiny_dataset, vae_files, tmp_path):
    """One VAE file on an SD1.5 model (scaling_factor 0.18215) and on an SDXL one (0.13025): the cached latents are
    scaled, so the second run must not read the first one's."""
    import shutil

    _, reference = vae_files
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    items = _items(data)
    for count, scale in enumerate((0.18215, 0.13025), start=1):
        source = LatentSource(_other_vae(scaling_factor=scale), items, seed=9, cache=True, to_disk=True)
        source.fill_cache()
        assert len(sorted(data.rglob("*.pti_latents.safetensors"))) == count * len(items)
        assert torch.allclose(source.latent(0, False), _expected_latent(reference, scale, items[0], 0, 9), atol=1e-5)


def test_the_path_is_carried_like_the_other_model_paths(preset, vae_files, tmp_path, monkeypatch):
    root, _ = vae_files
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "run.toml").write_text(f'vae = "../vaes/ldm.safetensors"\ntrain_data_dir = "{root}"\n')
    (tmp_path / "vaes").mkdir()
    (tmp_path / "vaes" / "ldm.safetensors").write_bytes((root / "ldm.safetensors").read_bytes())
    assert load_preset_dict(tmp_path / "presets" / "run.toml")["vae"] == str(tmp_path / "vaes" / "ldm.safetensors")
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = preset()
    config = load_config(None, {k: v for k, v in raw.items() if k != "stages"} | {"vae": "~/vaes/ldm.safetensors"})
    assert config.vae == str(tmp_path / "vaes" / "ldm.safetensors")
    assert resolved_dict(config)["vae"] == config.vae  # the resolved config beside the outputs, which resume reads
