"""Sample images during training from a kohya-style prompt file.

Each non-empty line not starting with ``#`` is a prompt with optional kohya flags:
``--n`` negative prompt, ``--w``/``--h`` size, ``--s`` steps, ``--l`` guidance scale, ``--d`` seed.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic_io import atomic_write_bytes


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float = 7.5
    seed: int | None = None


_FLAGS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int), "l": ("guidance", float), "d": ("seed", int)}


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
            raise ValueError(f"sample prompt flag --{flag} expects {cast.__name__}, got {value.strip()!r}") from None
    return sample


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [parse_prompt_line(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


@torch.no_grad()
def generate_samples(pipe, prompts: list[SamplePrompt], default_size: tuple[int, int], default_steps: int, out_paths: list[Path]) -> None:
    """Generate one PNG per prompt with ``pipe`` (a StableDiffusionPipeline) and write them atomically."""
    for index, (sample, out) in enumerate(zip(prompts, out_paths)):
        generator = torch.Generator().manual_seed(sample.seed if sample.seed is not None else index)
        image = pipe(
            sample.prompt,
            negative_prompt=sample.negative or None,
            width=sample.width or default_size[0],
            height=sample.height or default_size[1],
            num_inference_steps=sample.steps or default_steps,
            guidance_scale=sample.guidance,
            generator=generator,
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(out, buffer.getvalue())


def write_grid(rows: list[list[Path]], out: Path) -> None:
    """One PNG with the images of ``rows`` (e.g. before / after training) laid out row by row."""
    from PIL import Image

    images = [[Image.open(p).convert("RGB") for p in row] for row in rows]
    width = max(im.width for row in images for im in row)
    height = max(im.height for row in images for im in row)
    grid = Image.new("RGB", (width * max(len(r) for r in images), height * len(images)), (255, 255, 255))
    for y, row in enumerate(images):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
