"""A finished training run, loaded for measurement: base model + the run's LoRA and pivot, switchable.

:func:`load_run` reads ``<output_name>.config.toml`` (the resolved config the trainer writes) to
find the base model, the data, the token and the template; it loads the base model from local
files (never downloads; merged with the run's ``base_weights``, as it trained), builds the family's diffusers pipeline from it
(:meth:`~pti_plugin.models.loading.BaseModel.pipeline`: ``StableDiffusionPipeline`` for SD1.5,
``StableDiffusionXLPipeline`` for SDXL) and loads the run's LoRA and bundled pivot with
:func:`pti_plugin.load_pti.load_pti` (the path a diffusers user takes).
:meth:`LoadedRun.lora` switches the LoRA off to get the *base* model; the base model is prompted
with the class word, the fine-tuned one with the pivot token. :func:`open_model` gives the same
object for a base model alone (no run files: no LoRA, no pivot).

Conditioning is built with the run's model family through its adapter (``clip_skip`` honoured as
in training; every text encoder of the family, e.g. SDXL's two and its pooled embedding), and the
pipeline is called with ``prompt_embeds`` (plus ``pooled_prompt_embeds`` for SDXL), so generation
sees exactly the training-time conditioning. Token positions (the subject's) are read from the
first tokenizer's ids: SDXL's two tokenizers share CLIP's vocabulary and place every word at the
same index. Prompts are tokenised at the run's ``max_token_length`` (75, or kohya's 150 / 225 windows): ids and
per-token states are ``max_token_length + 2`` long, and a subject past the 77th token is found and weighted at its
own row (tested on SDXL at 225).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import toml
import torch

from ..config import EMBEDDED, Config, ConfigError
from ..config_loading import build_config, named_where_given
from ..models.family import Conditioning
from ..data.dataset import ImageItem, load_subsets
from ..data.latents import load_pixels
from ..data.scanning import scan_images
from ..sampling import pipeline_conditioning
from ..text_files import path_not_found
from .prompts import fill, normalise_prompt, pivot_subject


def find_run_files(run_dir: str | Path, output_name: str | None = None) -> tuple[Path, Path]:
    """``(config_toml, lora)`` of the run in ``run_dir``; ``output_name`` picks one of several runs."""
    run_dir = Path(run_dir)
    if output_name:
        configs = [run_dir / f"{output_name}.config.toml"]
    else:
        configs = sorted(run_dir.glob("*.config.toml"))
    configs = [c for c in configs if c.is_file()]
    if not configs:
        raise FileNotFoundError(f"no <output_name>.config.toml in {run_dir} (is it a training output_dir?)")
    if len(configs) > 1:
        names = ", ".join(c.name[: -len(".config.toml")] for c in configs)
        raise ValueError(f"{run_dir} holds several runs ({names}); pass the output_name of one")
    config_path = configs[0]
    lora = config_path.with_name(config_path.name[: -len(".config.toml")] + ".safetensors")
    return config_path, lora


def read_run_config(config_path: str | Path) -> Config:
    """The :class:`Config` of a resolved ``<output_name>.config.toml`` (paths not re-checked)."""
    raw = toml.load(str(config_path))
    try:
        return build_config(raw, check_paths=False)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc


def training_items(config: Config) -> list[ImageItem]:
    """The run's training images of the character (with captions and buckets), as the trainer scanned
    them; regularisation images (``is_reg``) are not the character and are left out."""
    train_dir = None
    if config.train_data_dir == EMBEDDED:
        from ..embedded_default import default_dataset_dir

        train_dir = default_dataset_dir(config.token_string)
    try:
        return [item for item in scan_images(config, load_subsets(config, train_dir)) if not item.is_reg]
    except OSError as exc:  # the run's images moved or were deleted since it trained
        key = "dataset_config" if config.dataset_config else "train_data_dir"
        raise ConfigError.at(key, f": the run's training images cannot be read ({exc.strerror}: {exc.filename})") from exc


def file_digest(path: str | Path, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-256 of a file (to show that runs share a pivot)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def tensors_digest(path: str | Path, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-256 of the safetensors file ``path`` as safetensors writes its tensors
    without metadata: the same tensors give the same digest whatever metadata a run wrote beside them (kohya's
    ``modelspec.*`` title and date), and a file without metadata gives its own :func:`file_digest`."""
    from safetensors.torch import load_file, save

    return hashlib.sha256(save(load_file(str(path)))).hexdigest()[:length]


@dataclass
class LoadedRun:
    """A run's pipeline and what the measurements need to prompt it.

    ``pipe`` holds the base model with the run's LoRA (on by default) and the pivot token;
    ``class_word`` is the base model's subject; ``template`` the run's caption template;
    ``items`` the training images. Tensors returned by the methods are on ``device``.
    """

    config: Config
    pipe: object
    family: object
    noise_scheduler: object
    prediction_type: str
    token: str
    num_vectors: int
    class_word: str
    template: str
    items: list[ImageItem]
    device: torch.device
    dtype: torch.dtype
    run_dir: Path | None = None
    lora_path: Path | None = None
    _lora_on: bool = field(default=True, repr=False)

    # ------------------------------------------------------------------ subjects and prompts
    @property
    def pivot_text(self) -> str:
        """The pivot as typed in a prompt (``tok1`` or ``tok1 tok1_1 ...``)."""
        return pivot_subject(self.token, self.num_vectors)

    def subject(self, tuned: bool) -> str:
        """The subject text: the pivot for the fine-tuned model, the class word for the base model."""
        return self.pivot_text if tuned else self.class_word

    def prompt(self, prompt: str, tuned: bool) -> str:
        """``prompt`` (with ``{}``/``{T}``/the token) filled with the subject of that model."""
        return fill(normalise_prompt(prompt, self.template, self.token), self.subject(tuned))

    # ------------------------------------------------------------------ model switches
    @contextlib.contextmanager
    def lora(self, enabled: bool) -> Iterator[None]:
        """Run the block with the run's LoRA on (fine-tuned model) or off (base model)."""
        previous = self._lora_on
        self._set_lora(enabled)
        try:
            yield
        finally:
            self._set_lora(previous)

    @property
    def has_lora(self) -> bool:
        """Whether LoRA adapters were loaded (a file without LoRA keys loads none)."""
        return any(getattr(m, "peft_config", None) for m in (self.pipe.unet, *self.text_encoders))

    def _set_lora(self, enabled: bool) -> None:
        if enabled == self._lora_on or not self.has_lora:
            self._lora_on = enabled
            return
        if enabled:
            self.pipe.enable_lora()
        else:
            self.pipe.disable_lora()
        self._lora_on = enabled

    # ------------------------------------------------------------------ tensors
    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The pipeline's text encoders, in the family's order."""
        return tuple(getattr(self.pipe, name) for name in self.family.text_encoder_names)

    @property
    def tokenizers(self) -> tuple[object, ...]:
        """The pipeline's tokenizers, one per text encoder, in the family's order."""
        return tuple(getattr(self.pipe, name.replace("text_encoder", "tokenizer")) for name in self.family.text_encoder_names)

    @property
    def tokenizer(self) -> object:
        """The first tokenizer: the one whose ids give token positions (see the module docstring)."""
        return self.tokenizers[0]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids as the family's conditioning takes them (CPU, int64): ``[B, L]`` (SD1.5) or ``[B, encoders, L]``
        (SDXL), L = the run's ``max_token_length + 2`` (77, or 152 / 227 with kohya's windows), the length of
        :meth:`conditioning`'s hidden states, whose rows are at the same positions (each window's 75 caption rows
        are stitched back in order)."""
        return self.family.tokenize(self.tokenizers, prompts)

    def token_positions_ids(self, prompts: list[str]) -> torch.Tensor:
        """The first tokenizer's ids ``[B, L]``, whose indices are the conditioning's token positions."""
        ids = self.tokenize(prompts)
        return ids if ids.dim() == 2 else ids[:, 0]

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The UNet conditioning of filled prompts (every tensor in the run's dtype), with the current LoRA state."""
        ids = self.tokenize(prompts).to(self.device)
        return self.family.encode(self.text_encoders, ids).map(lambda t: t.to(self.dtype))

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The per-token conditioning ``[B, L, d]`` of filled prompts (SDXL: both encoders' states side by side)."""
        return self.conditioning(prompts).hidden_states

    @torch.no_grad()
    def pre_layernorm_states(self, prompts: list[str]) -> torch.Tensor | None:
        """The encoder's state before its final LayerNorm ``[B, L, d]`` (float32); None where the family's
        conditioning does not end with one (SDXL)."""
        ids = self.tokenize(prompts).to(self.device)
        states = self.family.pre_layernorm_states(self.text_encoders, ids)
        return None if states is None else states.float()

    def final_layer_norm(self) -> torch.nn.LayerNorm | None:
        """The LayerNorm that ends the conditioning: the family's one final LayerNorm, None where it has none
        (SDXL: its conditioning is taken before any)."""
        norms = self.family.final_layer_norms(self.text_encoders)
        return norms[0] if len(norms) == 1 and isinstance(norms[0], torch.nn.LayerNorm) else None

    def pipeline_conditioning(self, cond: Conditioning, uncond: Conditioning, n: int) -> dict[str, torch.Tensor]:
        """The pipeline's arguments for ``n`` images of one prompt (:func:`pti_plugin.sampling.pipeline_conditioning`)."""
        return pipeline_conditioning(cond, uncond, n)

    def training_pixels(self, max_images: int | None = None) -> list[torch.Tensor]:
        """Training images fitted to their buckets: float32 ``[3, H, W]`` in [-1, 1] (CPU)."""
        items = self.items if max_images is None else self.items[:max_images]
        return [load_pixels(item, flip=False) for item in items]

    def training_images_uint8(self, max_images: int | None = None) -> list[np.ndarray]:
        """Training images as ``uint8 [H, W, 3]`` arrays."""
        return [
            ((p.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
            for p in self.training_pixels(max_images)
        ]

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior means, scaled: ``[B, 3, H, W]`` pixels -> ``[B, 4, H/f, W/f]``."""
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return (posterior.mean * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def unet(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction (epsilon or v, as trained) with the current LoRA state; ``cond`` has one row per
        latent. Families with size conditioning (SDXL) get the latents' own image size, uncropped (as the
        pipeline gives a generation)."""
        kwargs = cond.unet_kwargs()
        factor = self.pipe.vae_scale_factor
        height, width = (int(s) * factor for s in noisy.shape[-2:])
        sizes = torch.tensor([[height, width, 0, 0, height, width]]).expand(noisy.shape[0], 6)
        extra = {k: v.to(self.device, self.dtype) for k, v in self.family.size_conditioning(sizes).items()}
        if extra:
            kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), **extra}
        return self.pipe.unet(noisy.to(self.dtype), t.to(self.device), **kwargs).sample

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict for ``latents`` noised with ``noise`` at ``t``."""
        from ..diffusion_loss import training_target

        return training_target(self.noise_scheduler, latents, noise, t, self.prediction_type)

    def default_size(self) -> tuple[int, int]:
        """(width, height) of generations: the first training image's bucket."""
        return self.items[0].bucket


def load_run(
    run_dir: str | Path,
    output_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    class_word: str | None = None,
    lora_file: str | Path | None = None,
    config: Config | None = None,
) -> LoadedRun:
    """Load the run in ``run_dir`` (a training ``output_dir``) for measurement.

    ``class_word``: the base model's subject (default: the run's first ``init_word``).
    ``device``: default CUDA when available, else CPU.
    ``lora_file``: the LoRA (with its bundled pivot) to load instead of the run's final
    ``<output_name>.safetensors``, e.g. an intermediate save ``<output_name>-stepNNNNNNNN.safetensors``.
    ``config``: the run's, when already read (:func:`read_run_config`), not read again.
    """
    from ..load_pti import load_pti

    config_path, lora_path = find_run_files(run_dir, output_name)
    lora_path = Path(lora_file) if lora_file is not None else lora_path
    if not lora_path.is_file():
        raise FileNotFoundError(path_not_found(lora_path, "LoRA file") if lora_file is not None else
                                path_not_found(lora_path, "the run's LoRA", kind="the run has not finished"))
    config = read_run_config(config_path) if config is None else config

    def add_run(pipe) -> None:
        token = load_pti(pipe, lora_path, token=config.token_string)
        if token != config.token_string:
            raise ValueError(f"{lora_path} bundles no embedding for {config.token_string!r}")

    try:
        run = open_model(config, device, dtype, class_word, prepare=add_run)
    except ConfigError as exc:  # a key of the run's config (its model, its data): named in that file, not a preset
        raise named_where_given(exc, {}, [], {exc.key: str(config_path)}) from exc
    run.run_dir, run.lora_path = Path(run_dir), lora_path
    return run


def open_model(
    config: Config,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    class_word: str | None = None,
    prepare=None,
) -> LoadedRun:
    """The base model of ``config`` as a :class:`LoadedRun` (no LoRA; the token as the tokenizer has it):
    its family's pipeline with a DDIM sampler. ``prepare(pipe)``, when given, runs before the pipeline moves
    to ``device``/``dtype`` (:func:`load_run` loads the run's LoRA and pivot there)."""
    from diffusers import DDIMScheduler

    from ..base_weights import merge_base_weights
    from ..models.loading import load_base_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    items = training_items(config)  # before the model loads: a run whose images moved is named in seconds
    model = load_base_model(
        config.pretrained_model_name_or_path, config.clip_skip, config.v_parameterization,
        config.single_file_config, config.tokenizer_path, config.max_token_length, config.model_family,
        config.zero_terminal_snr, config.vae, disable_mmap=config.disable_mmap_load_safetensors,
    )
    merge_base_weights(model, config.base_weights, config.base_weights_multiplier)  # the base the run trained on
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config, prediction_type=model.prediction_type)
    pipe = model.pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    if prepare is not None:
        prepare(pipe)
    pipe.to(device, dtype)
    return LoadedRun(
        config=config, pipe=pipe, family=model.family, noise_scheduler=model.noise_scheduler,
        prediction_type=model.prediction_type, token=config.token_string,
        num_vectors=config.num_vectors_per_token, class_word=class_word or config.init_words[0],
        template=config.caption_template, items=items, device=device, dtype=dtype,
    )
