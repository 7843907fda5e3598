"""SDXL's LoRA key table and embedding layout: the architecture written out, and kohya's names for it.

Written out (not read from the installed diffusers or transformers, whose module names change
between versions): diffusers' ``UNet2DConditionModel`` for SDXL (``block_out_channels`` 320, 640,
1280; down blocks ``DownBlock2D``, ``CrossAttnDownBlock2D``, ``CrossAttnDownBlock2D`` with 1, 2 and
10 transformer blocks per ``Transformer2DModel``; the mid block 10; ``layers_per_block`` 2;
linear ``proj_in``/``proj_out``), CLIP ViT-L (``text_encoder``, 12 layers) and OpenCLIP bigG
(``text_encoder_2``, transformers' ``CLIPTextModelWithProjection``, 32 layers).

kohya ``networks.lora`` adapts, in each of the 11 ``Transformer2DModel``s, ``proj_in``,
``proj_out`` and the 10 attention/feed-forward linears of each of its 70 transformer blocks in all
(722 UNet modules), the attention and MLP linears of both text encoders (72 + 192), and with
LoCon's ``conv_dim`` each ResNet block's two convolutions, its time-embedding projection and its
shortcut convolution (where channels change) plus the down/upsampler convolutions (66 modules).

kohya trains SDXL on its own port of the original (sgm/LDM) UNet, so its UNet names are the
ORIGINAL module paths, not diffusers': ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``
is diffusers' ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``; inside a ResNet block
``in_layers_2``/``emb_layers_1``/``out_layers_3``/``skip_connection`` are ``conv1``/
``time_emb_proj``/``conv2``/``conv_shortcut``, a downsampler is ``input_blocks_<i>_0_op``, an
upsampler ``output_blocks_<i>_<j>_conv``. The text encoders are ``lora_te1_`` and ``lora_te2_``
followed by transformers' path with CLIP's ``text_model.`` prefix. AUTOMATIC1111 (which maps
``lora_unet_`` to its ``diffusion_model_`` modules directly) and diffusers'
``_maybe_map_sgm_blocks_to_diffusers`` read exactly these names.

The SDXL embedding file (AUTOMATIC1111's format, read by Forge, ComfyUI and diffusers) holds
``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]``; bundled in a LoRA the same two tensors sit
under ``bundle_emb.<token>.clip_l`` / ``.clip_g`` (as OneTrainer writes them).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from .family import TEXT_ENCODER_PREFIX, UNET_PREFIX, EmbeddingLayout, KeyTable, LoraKey, installed_text_encoder_has_prefix
from .sd15 import _TEXT_LAYER_LEAVES, _TRANSFORMER_BLOCK_LEAVES

SDXL_EMBEDDING_LAYOUT = EmbeddingLayout(standalone_keys=("clip_l", "clip_g"), bundle_keys=("clip_l", "clip_g"))

_BLOCK_OUT_CHANNELS = (320, 640, 1280)
_LAYERS_PER_BLOCK = 2
#: Transformer blocks per ``Transformer2DModel`` in each down block (0: no attention, ``DownBlock2D``).
_DOWN_TRANSFORMER_DEPTH = (0, 2, 10)
_MID_TRANSFORMER_DEPTH = 10
#: (diffusers component, kohya prefix, encoder layers) of the two text encoders.
_TEXT_ENCODERS = (("text_encoder", TEXT_ENCODER_PREFIX + "1_", 12), ("text_encoder_2", TEXT_ENCODER_PREFIX + "2_", 32))
#: diffusers' ``ResnetBlock2D`` layer -> the original ``ResBlock`` layer kohya names.
_RESNET_LEAVES = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

#: One adapted module: (diffusers path, original sgm path, conv).
_Row = tuple[str, str, bool]


def _transformer(diffusers: str, sgm: str, depth: int) -> Iterator[_Row]:
    """``proj_in``, the ``depth`` blocks' 10 linears each and ``proj_out`` of one ``Transformer2DModel``."""
    leaves = ["proj_in"] + [f"transformer_blocks.{j}.{leaf}" for j in range(depth) for leaf in _TRANSFORMER_BLOCK_LEAVES]
    for leaf in leaves + ["proj_out"]:
        yield f"{diffusers}.{leaf}", f"{sgm}.{leaf}", False


def _resnet(diffusers: str, sgm: str, in_channels: int, out_channels: int) -> Iterator[_Row]:
    """What kohya adapts in a ResNet block with ``conv_dim`` (``conv_shortcut`` only where channels change)."""
    for leaf, original in _RESNET_LEAVES.items():
        if leaf != "conv_shortcut" or in_channels != out_channels:
            yield f"{diffusers}.{leaf}", f"{sgm}.{original}", True


def _unet_rows() -> Iterator[_Row]:
    """Every module of SDXL's UNet that kohya's LoRA (and LoCon) adapts, in the original model's order."""
    channels, skips, sgm_index = _BLOCK_OUT_CHANNELS[0], [_BLOCK_OUT_CHANNELS[0]], 1  # input_blocks.0 is conv_in
    last = len(_BLOCK_OUT_CHANNELS) - 1
    for b, (out, depth) in enumerate(zip(_BLOCK_OUT_CHANNELS, _DOWN_TRANSFORMER_DEPTH)):
        for i in range(_LAYERS_PER_BLOCK):
            yield from _resnet(f"down_blocks.{b}.resnets.{i}", f"input_blocks.{sgm_index}.0", channels, out)
            if depth:
                yield from _transformer(f"down_blocks.{b}.attentions.{i}", f"input_blocks.{sgm_index}.1", depth)
            channels = out
            skips.append(channels)
            sgm_index += 1
        if b < last:
            yield f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{sgm_index}.0.op", True
            skips.append(channels)
            sgm_index += 1
    yield from _resnet("mid_block.resnets.0", "middle_block.0", channels, channels)
    yield from _transformer("mid_block.attentions.0", "middle_block.1", _MID_TRANSFORMER_DEPTH)
    yield from _resnet("mid_block.resnets.1", "middle_block.2", channels, channels)
    sgm_index = 0
    for b, (out, depth) in enumerate(zip(reversed(_BLOCK_OUT_CHANNELS), reversed(_DOWN_TRANSFORMER_DEPTH))):
        for i in range(_LAYERS_PER_BLOCK + 1):
            yield from _resnet(f"up_blocks.{b}.resnets.{i}", f"output_blocks.{sgm_index}.0", channels + skips.pop(), out)
            channels = out
            if depth:
                yield from _transformer(f"up_blocks.{b}.attentions.{i}", f"output_blocks.{sgm_index}.1", depth)
            if i == _LAYERS_PER_BLOCK and b < last:  # the upsampler follows the block's last layers
                yield f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{sgm_index}.{2 if depth else 1}.conv", True
            sgm_index += 1


def _kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


@functools.cache
def installed_text_encoder_2_has_prefix() -> bool:
    """Whether the installed transformers' ``CLIPTextModelWithProjection`` nests its modules under ``text_model.``
    (transformers 5 flattened ``CLIPTextModel`` but not this one)."""
    return installed_text_encoder_has_prefix("CLIPTextModelWithProjection")


@functools.cache
def sdxl_key_table() -> KeyTable:
    """SDXL's LoRA key table (see the module docstring): 722 + 66 (LoCon) UNet rows, 72 + 192 text-encoder rows."""
    keys = [LoraKey("unet", path, _kohya_name(UNET_PREFIX, sgm), conv=conv) for path, sgm, conv in _unet_rows()]
    for component, prefix, layers in _TEXT_ENCODERS:
        paths = [f"text_model.encoder.layers.{i}.{leaf}" for i in range(layers) for leaf in _TEXT_LAYER_LEAVES]
        keys += [LoraKey(component, p, _kohya_name(prefix, p)) for p in paths]
    return KeyTable(
        keys,
        optional_prefixes={component: "text_model." for component, _, _ in _TEXT_ENCODERS},
        prefix_probes={"text_encoder_2": installed_text_encoder_2_has_prefix},
    )
