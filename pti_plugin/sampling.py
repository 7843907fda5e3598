"""Sample images during training from a kohya-style prompt file.

Each non-empty line not starting with ``#`` is a prompt with optional kohya flags:
``--n`` negative prompt, ``--w``/``--h`` size, ``--s`` steps, ``--l`` guidance scale, ``--d`` seed, ``--ss``
sampler (:data:`SAMPLERS`, kohya's names). A ``.toml`` or ``.json`` file is read as kohya's ``load_prompts`` reads
it (:func:`prompt_file_entries`): tables of kohya's keys (:data:`PROMPT_KEYS`), or lines as above in a JSON list.
Prompts are conditioned through the model family, as in training
(:func:`generate_samples`' ``encode``); a failure between training steps is a warning
(:func:`sample_during_training`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic_io import atomic_write_bytes
from .stop_signals import STOP_SIGNALS, StopSignals
from .text_files import load_toml_text, read_user_text

logger = logging.getLogger(__name__)

#: kohya's ``sample_sampler`` names: the diffusers scheduler each one samples with, and its options (as kohya's
#: sample-image code builds them; the ``k_`` names are aliases; ``dpmsolver`` ends at sigma_min, which diffusers
#: requires of it). The model's own scheduler config supplies the rest (betas, prediction type).
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD1.5's own scheduler config: PLMS from the first step
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}


def sample_scheduler(name: str, model_scheduler_config):
    """The diffusers scheduler that samples with kohya's sampler ``name`` (:data:`SAMPLERS`), built from the
    model's scheduler config."""
    import diffusers

    class_name, options = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(model_scheduler_config, **options)


class SamplesInterrupted(Exception):
    """SIGINT or SIGTERM arrived while samples were drawn between steps (:func:`sample_during_training`)."""


def sample_during_training(sample: Callable[[str], list[Path]], tag: str, on_signal: Callable | None = None) -> list[Path]:
    """``sample(tag)`` before, between or after the training steps. A failure in it (out of memory, a sampler error)
    is a warning naming the tag and the error, and training goes on: the samples are not needed for the run, and a
    failing one used to end it with a traceback, losing the steps since the last save (or, at the end, hiding that
    the final files were saved). With ``on_signal`` (the trainer's SIGINT/SIGTERM
    handler), a signal during the samples is handed to it and stops them at once, so the trainer saves and stops
    after this step without waiting for the samples (a cluster's SIGKILL follows its SIGTERM after a grace time)."""
    previous, stopping = {}, []

    def stop(signum, frame):
        on_signal(signum, frame)  # the trainer records it (a later second one stops the run at once)
        if not stopping:  # only once: a second exception here could escape the handling of the first
            stopping.append(signum)
            raise SamplesInterrupted(signal.Signals(signum).name)

    if on_signal is not None and threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        return sample(tag)
    except SamplesInterrupted as exc:
        logger.warning("samples %s stopped by %s", tag, exc)
    except Exception as exc:  # noqa: BLE001 - whatever broke the samples, the training state is intact
        logger.warning("samples %s failed, the run goes on without them: %s: %s", tag, type(exc).__name__, exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    finally:
        StopSignals.restore(previous)
    return []


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float = 7.5
    seed: int | None = None
    sampler: str | None = None  # kohya's --ss: this prompt's sampler instead of sample_sampler


#: kohya's smallest sample side (px): ``sample_image_inference`` makes a smaller one this size.
MIN_SAMPLE_SIDE = 64


def kohya_sample_side(value: int) -> int:
    """The side (px) kohya samples for a prompt's ``--w``/``--h`` (``width``/``height``) ``value``: rounded down to
    a multiple of 8, at least :data:`MIN_SAMPLE_SIDE` (``sample_image_inference``: ``max(64, v - v % 8)``)."""
    return max(MIN_SAMPLE_SIDE, value - value % 8)


def sampler_name(text: str) -> str:
    """A sampler name as kohya reads it (lower case, spaces as underscores), one of :data:`SAMPLERS`."""
    name = text.strip().lower().replace(" ", "_")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {text.strip()!r}")
    return name


_FLAGS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int), "l": ("guidance", float),
          "d": ("seed", int), "ss": ("sampler", sampler_name)}
#: What a flag whose value does not parse expects, where its parser's name does not say it.
_EXPECTS = {"ss": "one of kohya's sampler names (" + ", ".join(SAMPLERS) + ")"}


def parse_prompt_line(line: str) -> SamplePrompt:
    """``"tok1 in the snow --w 512 --h 512 --d 1"`` -> SamplePrompt; unknown flags raise ValueError."""
    parts = re.split(r"\s--(\w+)\s*", " " + line.strip())
    sample = SamplePrompt(parts[0].strip())
    for flag, value in zip(parts[1::2], parts[2::2]):
        if flag not in _FLAGS:
            raise ValueError(f"sample prompt flag --{flag} unknown; supported: {', '.join('--' + f for f in _FLAGS)}")
        name, cast = _FLAGS[flag]
        try:
            setattr(sample, name, cast(value.strip()))
        except ValueError:
            raise ValueError(f"sample prompt flag --{flag} expects {_EXPECTS.get(flag, cast.__name__)}, "
                             f"got {value.strip()!r}") from None
    return sample


#: The keys of a prompt table in a ``.toml``/``.json`` prompt file (kohya's ``sample_image_inference`` reads them;
#: its ``line_to_prompt_dict`` writes them for the flags above) -> (SamplePrompt field, the value's type).
PROMPT_KEYS = {"prompt": ("prompt", str), "negative_prompt": ("negative", str), "width": ("width", int),
               "height": ("height", int), "sample_steps": ("steps", int), "scale": ("guidance", float),
               "seed": ("seed", int), "sample_sampler": ("sampler", str)}


def prompt_file_entries(path: str | Path) -> list[tuple[str, str | dict]]:
    """The prompts of a ``sample_prompts`` file as kohya's ``load_prompts`` finds them, each with where it is: a
    ``.toml`` file's ``[prompt]`` table merged with each of its ``[[prompt.subset]]`` tables (``prompt N``; kohya
    fails where both set a key, here the subset's value wins), a ``.json`` file's list of tables or prompt lines
    (``prompt N``), any other file's lines but blank and ``#`` ones (``line N``). ValueError: not that shape."""
    path = Path(path)
    text = read_user_text(path)  # a BOM dropped; CRLF lines split; UTF-16 refused saying how to save it
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        return [(f"line {n}", line) for n, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if suffix == ".toml":
        table = load_toml_text(text).get("prompt")
        subsets = table.get("subset") if isinstance(table, dict) else None
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise ValueError("is not in kohya's .toml prompt format: a [prompt] table of defaults and "
                             "[[prompt.subset]] tables, one a prompt")
        defaults = {key: value for key, value in table.items() if key != "subset"}
        entries: list = [defaults | subset for subset in subsets]
    else:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON ({exc})") from None
        if not isinstance(entries, list) or not all(isinstance(e, (str, dict)) for e in entries):
            raise ValueError("is not in kohya's .json prompt format: a list of prompt tables or prompt lines")
    return [(f"prompt {n}", entry) for n, entry in enumerate(entries, start=1)]


def parse_prompt_entry(entry: str | dict) -> SamplePrompt:
    """A prompt line (:func:`parse_prompt_line`) or a table of :data:`PROMPT_KEYS` -> SamplePrompt; ValueError
    names a key this trainer does not take or a value of the wrong type."""
    if isinstance(entry, str):
        return parse_prompt_line(entry)
    sample = SamplePrompt("")
    for key, value in entry.items():
        if key not in PROMPT_KEYS:
            raise ValueError(f"key {key!r} unknown; supported: {', '.join(PROMPT_KEYS)}")
        name, kind = PROMPT_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ValueError(f"key {key!r} expects {'a number' if kind is float else kind.__name__}, got {value!r}")
        setattr(sample, name, sampler_name(value) if key == "sample_sampler" else kind(value))
    return sample


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    return [parse_prompt_entry(entry) for _, entry in prompt_file_entries(path)]


#: Extra conditioning (``Conditioning.added_cond_kwargs`` key) that diffusers pipelines take as arguments:
#: key -> (argument, negative argument). SDXL's ``time_ids`` are not among them: the pipeline builds them.
PIPELINE_ARGUMENTS = {"text_embeds": ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")}


def pipeline_conditioning(cond, uncond, n: int = 1) -> dict[str, torch.Tensor]:
    """A diffusers pipeline's arguments for ``n`` images of one prompt from two
    :class:`~pti_plugin.models.family.Conditioning`: ``prompt_embeds`` and ``negative_prompt_embeds`` (``cond`` /
    ``uncond`` rows repeated), plus each extra conditioning the pipeline takes as an argument (SDXL's pooled
    embedding). The size ids are left to the pipeline, which builds them from the image size."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.expand(n, *t.shape[1:])

    kwargs = {"prompt_embeds": rows(cond.hidden_states), "negative_prompt_embeds": rows(uncond.hidden_states)}
    for key, (positive, negative) in PIPELINE_ARGUMENTS.items():
        if key in cond.added_cond_kwargs:
            kwargs[positive] = rows(cond.added_cond_kwargs[key])
            kwargs[negative] = rows(uncond.added_cond_kwargs[key])
    return kwargs


@torch.no_grad()
def generate_samples(pipe, prompts: list[SamplePrompt], default_size: tuple[int, int], default_steps: int, out_paths: list[Path],
                     encode: Callable[[list[str]], object] | None = None) -> None:
    """Generate one PNG per prompt with ``pipe`` (a StableDiffusionPipeline; a prompt's ``--ss`` sampler replaces
    its scheduler for that prompt) and write them atomically (the prompt in the PNG's ``prompt`` text chunk).
    ``encode`` (texts -> the family's ``Conditioning``): prompt and negative prompt are conditioned as in training
    (``clip_skip``, long-caption windows, both prompts alike), not by the pipeline's own text encoding; each
    distinct text once per call (a prompt file repeats one negative prompt on every line), the same tensors
    for every prompt that uses it. A ``--w``/``--h`` is sampled as kohya does (:func:`kohya_sample_side`)."""
    from PIL.PngImagePlugin import PngInfo

    default = pipe.scheduler
    encoded: dict[str, object] = {}

    def condition(text: str):
        if text not in encoded:
            encoded[text] = encode([text])
        return encoded[text]

    for index, (sample, out) in enumerate(zip(prompts, out_paths)):
        pipe.scheduler = sample_scheduler(sample.sampler, default.config) if sample.sampler else default
        generator = torch.Generator().manual_seed(sample.seed if sample.seed is not None else index)
        text = ({"prompt": sample.prompt, "negative_prompt": sample.negative or None} if encode is None
                else pipeline_conditioning(condition(sample.prompt), condition(sample.negative)))
        image = pipe(
            **text,
            width=default_size[0] if sample.width is None else kohya_sample_side(sample.width),
            height=default_size[1] if sample.height is None else kohya_sample_side(sample.height),
            num_inference_steps=sample.steps or default_steps,
            guidance_scale=sample.guidance,
            generator=generator,
        ).images[0]
        info = PngInfo()
        info.add_text("prompt", sample.prompt)  # the before/after grid's column caption
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        atomic_write_bytes(out, buffer.getvalue())


#: Smallest side (px) of a cell of the before/after grid (smaller samples are upscaled, nearest).
GRID_MIN_CELL = 256
GRID_LABEL_WIDTH = 64
GRID_CAPTION_LINES = 4
GRID_GAP = 4  # gray gutter between cells (white-background samples stay apart)
_LINE_HEIGHT = 14
_INK = (0, 0, 0)


def _wrap(draw, text: str, width: int, font) -> list[str]:
    """``text`` broken into lines no wider than ``width`` px (long words are cut)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        while draw.textlength(candidate, font=font) > width and len(candidate) > 1:
            cut = len(candidate)
            while cut > 1 and draw.textlength(candidate[:cut], font=font) > width:
                cut -= 1
            lines.append(candidate[:cut])
            candidate = candidate[cut:]
        line = candidate
    return lines + ([line] if line else [])


def write_grid(rows: list[list[Path]], out: Path, labels: tuple[str, ...] = ("before", "after")) -> None:
    """One PNG with the images of ``rows`` (e.g. before / after training) laid out row by row.

    Each image is upscaled (nearest) by a whole factor to at least :data:`GRID_MIN_CELL` px; each
    row is labelled on its left (``labels``), and each column carries its prompt underneath (the
    ``prompt`` text chunk :func:`generate_samples` writes; none for images without it).
    """
    from PIL import Image, ImageDraw, ImageFont

    images = [[Image.open(p) for p in row] for row in rows]
    prompts = [im.text.get("prompt", "") if hasattr(im, "text") else "" for im in images[0]]
    images = [[im.convert("RGB") for im in row] for row in images]
    width = max(im.width for row in images for im in row)
    height = max(im.height for row in images for im in row)
    scale = max(1, -(-GRID_MIN_CELL // min(width, height)))
    cell_w, cell_h = width * scale, height * scale
    columns = max(len(r) for r in images)
    caption_h = GRID_CAPTION_LINES * _LINE_HEIGHT + 8
    step_w, step_h = cell_w + GRID_GAP, cell_h + GRID_GAP
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + step_w * columns, GRID_GAP + step_h * len(images) + caption_h), (200, 200, 200))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for y, row in enumerate(images):
        label = labels[y] if y < len(labels) else ""
        draw.text((6, GRID_GAP + y * step_h + cell_h // 2 - _LINE_HEIGHT // 2), label, fill=_INK, font=font)
        for x, image in enumerate(row):
            grid.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST),
                       (GRID_LABEL_WIDTH + x * step_w, GRID_GAP + y * step_h))
    for x, prompt in enumerate(prompts):
        lines = _wrap(draw, prompt, cell_w - 8, font)[:GRID_CAPTION_LINES]
        for k, line in enumerate(lines):
            draw.text((GRID_LABEL_WIDTH + x * step_w + 4, GRID_GAP + len(images) * step_h + 2 + k * _LINE_HEIGHT), line,
                      fill=_INK, font=font)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
