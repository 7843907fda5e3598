"""The before/after grid: nearest-upscaled cells of at least 256 px, labelled rows, prompts under the columns."""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pti_plugin.sampling import GRID_GAP, GRID_LABEL_WIDTH, write_grid

STEP = 256 + GRID_GAP  # a cell and its gutter


def _png(path, seed: int, prompt: str | None):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", prompt)
    Image.fromarray(pixels).save(path, pnginfo=info)
    return path, pixels


def _ink(region: np.ndarray) -> int:
    """Number of dark (text) pixels in a white region."""
    return int((region.min(axis=-1) < 128).sum())


def test_grid_is_upscaled_labelled_and_captioned(tmp_path):
    prompts = ["tok1 at the top left on a white background", "a circle", None]
    before = [_png(tmp_path / f"b{k}.png", k, p) for k, p in enumerate(prompts)]
    after = [_png(tmp_path / f"a{k}.png", 10 + k, p) for k, p in enumerate(prompts)]
    out = tmp_path / "samples" / "grid.png"
    write_grid([[p for p, _ in before], [p for p, _ in after]], out)
    grid = np.asarray(Image.open(out).convert("RGB"))
    height, width, _ = grid.shape
    assert width == GRID_LABEL_WIDTH + 3 * STEP and 2 * STEP < height < 2 * STEP + 100
    for row, images in enumerate((before, after)):  # each cell is its image, 8x nearest: every 8x8 block is one pixel
        for col, (_, pixels) in enumerate(images):
            top, left = GRID_GAP + row * STEP, GRID_LABEL_WIDTH + col * STEP
            cell = grid[top : top + 256, left : left + 256]
            np.testing.assert_array_equal(cell, pixels.repeat(8, axis=0).repeat(8, axis=1))
    labels = [grid[GRID_GAP + row * STEP : (row + 1) * STEP, :GRID_LABEL_WIDTH] for row in range(2)]
    assert _ink(labels[0]) > 20 and _ink(labels[1]) > 20 and not np.array_equal(labels[0], labels[1])
    captions = [grid[GRID_GAP + 2 * STEP :, GRID_LABEL_WIDTH + col * STEP : GRID_LABEL_WIDTH + (col + 1) * STEP]
                for col in range(3)]
    assert _ink(captions[0]) > _ink(captions[1]) > 20 and _ink(captions[2]) == 0  # longer prompt, more ink; none
