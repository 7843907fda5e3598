"""Ground-truth detectors for toy-world images (rendered or generated), in numpy.

:func:`detect` reads one ``uint8 (32, 32, 3)`` image: the background colour (nearest palette
entry to the median border pixel), the object (the largest 4-connected component of pixels far
from the background), its colour (nearest palette entry to the median of its core pixels), its
shape (best soft IoU of the object's coverage against each shape fitted by area and centroid), its
centroid and its 3x3 grid cell (cell boundaries half-way between :data:`~.world.CELL_CENTRES`).

The PTI character is read in two parts: :func:`detect_character` (the coarse look: two colours in
order and a disc, the dot not required) and :func:`has_detail` (its private white dot at the
object's centre); :func:`appearance_error` grades how far the object is from the rendered
character (a continuous error that keeps falling as the look improves, where a hit rate is 0 or 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import (
    BACKGROUNDS,
    CELL_CENTRES,
    CHARACTER_COLOURS,
    CHARACTER_SIZE,
    COLOURS,
    DETAIL_SIZE,
    IMAGE_SIZE,
    SHAPES,
    parse_caption,
    render_character,
    shape_coverage,
)

#: A pixel belongs to the object when its RGB distance to the background exceeds this fraction of
#: the distance between the background and the object's estimated colour (and at least MIN_DIST).
MASK_FRACTION = 0.5
MIN_DIST = 40.0
#: Components smaller than this many pixels are not objects.
MIN_OBJECT_PIXELS = 12
CELL_BOUNDARIES = tuple((a + b) / 2 for a, b in zip(CELL_CENTRES, CELL_CENTRES[1:]))


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` reads from an image. Object fields are ``None`` when none is found.

    ``centroid`` is ``(x, y)`` in pixels (pixel ``(i, j)`` has centre ``(j + 0.5, i + 0.5)``);
    ``row``/``col`` are grid indices 0..2; ``shape_iou`` is the best template IoU.
    """

    background: str
    colour: str | None
    shape: str | None
    centroid: tuple[float, float] | None
    row: int | None
    col: int | None
    num_pixels: int
    shape_iou: float


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [float(np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(dists))]


def detect_background(img: np.ndarray) -> str:
    """Background palette name of a ``uint8 (32, 32, 3)`` image (median of the 1-px border)."""
    x = img.astype(np.float32)
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]], axis=0)
    return _nearest(np.median(border, axis=0), BACKGROUNDS)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask ``(H, W)`` of the largest 4-connected component of ``mask`` (all False if empty)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    height, width = mask.shape
    for i0, j0 in zip(*np.nonzero(mask)):
        if labels[i0, j0]:
            continue
        label += 1
        labels[i0, j0] = label
        stack, size = [(i0, j0)], 0
        while stack:
            i, j = stack.pop()
            size += 1
            for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= a < height and 0 <= b < width and mask[a, b] and not labels[a, b]:
                    labels[a, b] = label
                    stack.append((a, b))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask, dtype=bool)


def object_mask(img: np.ndarray, background: str) -> np.ndarray:
    """Boolean ``(32, 32)`` mask of the object: the largest component of far-from-background pixels.

    The threshold adapts to the object: half the distance from the background to the median
    colour of the clearly non-background pixels, so anti-aliased or blurred rims count as half.
    """
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    dist = np.linalg.norm(img.astype(np.float32) - bg, axis=-1)
    candidates = dist > MIN_DIST
    if not candidates.any():
        return candidates
    object_dist = float(np.median(dist[candidates]))
    return largest_component(close_gaps(dist > max(MIN_DIST, MASK_FRACTION * object_dist)))


def _shifted_any(mask: np.ndarray, outside: bool) -> np.ndarray:
    """``mask`` or any of its 4 neighbours; pixels beyond the image count as ``outside``."""
    padded = np.pad(mask, 1, constant_values=outside)
    return padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose 4 neighbours are all in it (beyond the image counts as outside the mask)."""
    return ~_shifted_any(~mask, True)


def close_gaps(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus its 1-px gaps (a morphological closing with the 4-neighbour cross), such as the
    row where a two-tone object's halves blend into a colour near the background (orange and blue
    average to about the gray background); the outline does not grow."""
    return mask | interior(_shifted_any(mask, False))


def object_alpha(img: np.ndarray, background: str, mask: np.ndarray) -> np.ndarray:
    """Soft coverage float32 ``(32, 32)`` in [0, 1] of the object ``mask`` (its component only).

    Each pixel's RGB distance to the background divided by the median distance of the mask's
    pixels, clipped to [0, 1], kept within one pixel of ``mask``.
    """
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    dist = np.linalg.norm(img.astype(np.float32) - bg, axis=-1)
    near = mask.copy()
    near[1:, :] |= mask[:-1, :]
    near[:-1, :] |= mask[1:, :]
    near[:, 1:] |= mask[:, :-1]
    near[:, :-1] |= mask[:, 1:]
    alpha = np.clip(dist / max(float(np.median(dist[mask])), 1.0), 0.0, 1.0) * near
    return np.maximum(alpha, interior(mask))  # the mask's interior is covered, whatever its colour


def classify_shape(alpha: np.ndarray) -> tuple[str, float]:
    """Best-matching shape of a soft object coverage ``(32, 32)`` and its soft IoU with it.

    Each shape is fitted by moments — same area and same area centroid as ``alpha`` — rendered
    like the world renders it, and compared by soft IoU ``sum(min) / sum(max)``.
    """
    area = float(alpha.sum())
    ii, jj = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    cx = float((alpha * (jj + 0.5)).sum() / area)
    cy = float((alpha * (ii + 0.5)).sum() / area)
    fits = {  # shape -> (bounding-box centre y, size) with the same area and centroid
        "circle": (cy, 2.0 * np.sqrt(area / np.pi)),
        "square": (cy, np.sqrt(area)),
        "triangle": (cy - np.sqrt(2.0 * area) / 6.0, np.sqrt(2.0 * area)),
    }
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        box_cy, size = fits[shape]
        template = shape_coverage(shape, cx, box_cy, float(size))
        iou = float(np.minimum(template, alpha).sum() / max(np.maximum(template, alpha).sum(), 1e-6))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def cell_of(coordinate: float) -> int:
    """Grid index 0..2 of a pixel coordinate (x for the column, y for the row)."""
    return int(np.searchsorted(np.asarray(CELL_BOUNDARIES), coordinate))


def detect(img: np.ndarray) -> Detection:
    """Read background, object colour, shape, centroid and cell from a ``uint8 (32, 32, 3)`` image."""
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected a (32, 32, 3) image, got {img.shape}")
    background = detect_background(img)
    mask = object_mask(img, background)
    n = int(mask.sum())
    if n < MIN_OBJECT_PIXELS:
        return Detection(background, None, None, None, None, None, n, 0.0)
    ii, jj = np.nonzero(mask)
    cx, cy = float(jj.mean() + 0.5), float(ii.mean() + 0.5)
    # Core pixels: the object mask eroded by one pixel where possible (drops blended rims).
    core = mask.copy()
    core[1:, :] &= mask[:-1, :]
    core[:-1, :] &= mask[1:, :]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    pixels = img[core if core.sum() >= 4 else mask].astype(np.float32)
    colour = _nearest(np.median(pixels, axis=0), COLOURS)
    shape, iou = classify_shape(object_alpha(img, background, mask))
    return Detection(background, colour, shape, (cx, cy), cell_of(cy), cell_of(cx), n, iou)


@dataclass(frozen=True)
class CharacterDetection:
    """What :func:`detect_character` reads: the object's half colours, shape and cell, and the verdict.

    ``top_colour``/``bottom_colour`` are palette names of the median colour of the object's pixels
    above / below its centroid (``None`` without an object); ``is_character`` is true when they are
    the character's two colours in order and the shape reads as a circle; :attr:`match` gives
    partial credit.
    """

    object: Detection
    top_colour: str | None
    bottom_colour: str | None
    is_character: bool

    @property
    def match(self) -> float:
        """Fraction of the character's three traits found: top colour, bottom colour, circle (0 without an object)."""
        traits = (self.top_colour == CHARACTER_COLOUR_NAMES[0], self.bottom_colour == CHARACTER_COLOUR_NAMES[1],
                  self.object.shape == "circle")
        return sum(traits) / 3.0


#: Palette names of the character's top and bottom colours.
CHARACTER_COLOUR_NAMES = tuple(
    next(name for name, rgb in COLOURS.items() if rgb == tuple(c)) for c in CHARACTER_COLOURS
)


def half_colours(img: np.ndarray, found: Detection) -> tuple[str | None, str | None]:
    """Palette names of the median colour of the object's pixels above / below the middle of its
    bounding box, where a two-tone object changes colour (a triangle's centroid lies lower) —
    ``None`` for a half with fewer than 3 pixels or without an object."""
    if found.centroid is None:
        return None, None
    mask = object_mask(img, found.background)
    rows = np.arange(IMAGE_SIZE, dtype=np.float32)[:, None] + 0.5
    occupied = np.nonzero(mask.any(axis=1))[0]
    cy = (occupied[0] + occupied[-1] + 1) / 2.0
    halves = []
    for part in (mask & (rows < cy - 0.5), mask & (rows > cy + 0.5)):
        halves.append(_nearest(np.median(img[part].astype(np.float32), axis=0), COLOURS) if part.sum() >= 3 else None)
    return halves[0], halves[1]


def detect_character(img: np.ndarray) -> CharacterDetection:
    """Is the PTI character's coarse look (a disc, top half and bottom half in the character's two
    colours; the detail is not required) in a ``uint8 (32, 32, 3)`` image?"""
    found = detect(img)
    top, bottom = half_colours(img, found)
    verdict = (top, bottom) == CHARACTER_COLOUR_NAMES and found.shape == "circle"
    return CharacterDetection(found, top, bottom, verdict)


#: The detail is searched within this distance (px) of the object's centroid, and is present when
#: some pixel there is near-white: its darkest channel at least DETAIL_MIN_CHANNEL (the character's
#: colours and the gray background have a channel <= 128; the rendered dot always covers one
#: pixel fully, wherever its centre falls) ...
DETAIL_SEARCH_RADIUS = DETAIL_SIZE / 2 + 1.0
DETAIL_MIN_CHANNEL = 180
#: ... the ring just outside it (DETAIL_SEARCH_RADIUS to DETAIL_SEARCH_RADIUS + 2 px) is at least
#: half object, so a white centre must be enclosed by the object (on a white background the dot is
#: a hole in the object's mask) ...
DETAIL_RING_COVER = 0.5
DETAIL_RING_OUTER = DETAIL_SEARCH_RADIUS + 2.0
#: ... and the object is object-sized: at most this many pixels (a 12-px disc has about 113, the
#: largest square 144; a noise image's "object" covers most of the image).
DETAIL_MAX_OBJECT_PIXELS = 300


def _distance_from(centre: tuple[float, float]) -> np.ndarray:
    ii, jj = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    return np.sqrt((jj + 0.5 - centre[0]) ** 2 + (ii + 0.5 - centre[1]) ** 2)


def detail_strength(img: np.ndarray, found: Detection) -> float:
    """How white the object's centre is: the largest darkest-channel value (0..255) of the pixels
    within :data:`DETAIL_SEARCH_RADIUS` of the detected centroid (0 without an object)."""
    if found.centroid is None:
        return 0.0
    near = _distance_from(found.centroid) <= DETAIL_SEARCH_RADIUS
    return float(img[near].min(axis=-1).max()) if near.any() else 0.0


def has_detail(img: np.ndarray, found: Detection | None = None) -> bool:
    """Is the character's private detail (a white dot at the object's centre) in a ``uint8 (32, 32, 3)``
    image? ``found`` is :func:`detect`'s reading of ``img`` (computed when not given)."""
    found = detect(img) if found is None else found
    if found.centroid is None or found.num_pixels > DETAIL_MAX_OBJECT_PIXELS:
        return False
    if detail_strength(img, found) < DETAIL_MIN_CHANNEL:
        return False
    distance = _distance_from(found.centroid)
    ring = (distance > DETAIL_SEARCH_RADIUS) & (distance <= DETAIL_RING_OUTER)
    return float(object_mask(img, found.background)[ring].mean()) >= DETAIL_RING_COVER


#: A detail is *true to size* when its near-white pixels within DETAIL_RING_OUTER px of the
#: centroid (the dot and the ring around it) are at most this many: the rendered dot covers 4-7,
#: depending on where it falls in the pixel grid, while LoRA runs under pivot locality draw white holes
#: that :func:`has_detail` accepts (its ring test only asks that the white be enclosed by the object).
DETAIL_MAX_WHITE_PIXELS = 8


def detail_white_pixels(img: np.ndarray, found: Detection) -> int:
    """Near-white pixels (darkest channel >= :data:`DETAIL_MIN_CHANNEL`) within :data:`DETAIL_RING_OUTER` px
    of the detected centroid of a ``uint8 (32, 32, 3)`` image (0 without an object)."""
    if found.centroid is None:
        return 0
    near = _distance_from(found.centroid) <= DETAIL_RING_OUTER
    return int((img[near].min(axis=-1) >= DETAIL_MIN_CHANNEL).sum())


def detail_size(img: np.ndarray, found: Detection) -> int | None:
    """:func:`detail_white_pixels` of the detail :func:`has_detail` finds in ``img``; None without one."""
    return detail_white_pixels(img, found) if has_detail(img, found) else None


def is_true_size(size: int | None) -> bool:
    """Is a :func:`detail_size` a dot drawn to size: a detail of at most :data:`DETAIL_MAX_WHITE_PIXELS`?"""
    return size is not None and size <= DETAIL_MAX_WHITE_PIXELS


def has_true_size_detail(img: np.ndarray, found: Detection | None = None) -> bool:
    """:func:`has_detail` with the dot no larger than :data:`DETAIL_MAX_WHITE_PIXELS` (not a white hole)."""
    return is_true_size(detail_size(img, detect(img) if found is None else found))


#: Position steps (px) of the appearance error's coarse-to-fine search around the centroid.
_FIT_STEPS = (0.5, 0.25, 0.125, 0.0625)


def _character_error(img: np.ndarray, background: str, cx: float, cy: float, detected: np.ndarray) -> float:
    reference = render_character(cx, cy, background)
    inside = (shape_coverage("circle", cx, cy, CHARACTER_SIZE) > 0) | detected
    diff = np.linalg.norm(img[inside].astype(np.float32) - reference[inside].astype(np.float32), axis=-1)
    return float(diff.mean() / (255.0 * np.sqrt(3.0)))


def appearance_error(img: np.ndarray, found: Detection | None = None) -> float:
    """Graded distance of the object in a ``uint8 (32, 32, 3)`` image from the character's look.

    The mean RGB distance, over the pixels inside the object (the detected object mask united with
    the rendered character's disc), between the image and :func:`~.world.render_character` (dot
    included) on the detected background at the best-fitting position: a coarse-to-fine search
    down to 1/16 px around the detected centroid (the image centre without an object), so that the
    figure measures the look, not the placement. Divided by the largest RGB distance: 0 for the
    character as rendered, growing with every colour, shape or detail departure, never stuck at 1.
    """
    found = detect(img) if found is None else found
    cx, cy = found.centroid if found.centroid is not None else (IMAGE_SIZE / 2, IMAGE_SIZE / 2)
    detected = object_mask(img, found.background)
    best = _character_error(img, found.background, cx, cy, detected)
    for step in _FIT_STEPS:
        centre = (cx, cy)
        for dx in (-step, 0.0, step):
            for dy in (-step, 0.0, step):
                if dx or dy:
                    error = _character_error(img, found.background, centre[0] + dx, centre[1] + dy, detected)
                    if error < best:
                        best, cx, cy = error, centre[0] + dx, centre[1] + dy
    return best


def position_entropy(cells: list[tuple[int, int]]) -> float:
    """Entropy of the 3x3 histogram of ``(row, col)`` cells divided by ``log(9)`` (0 if empty)."""
    if not cells:
        return 0.0
    counts = np.zeros(9)
    for row, col in cells:
        counts[3 * row + col] += 1
    p = counts[counts > 0] / counts.sum()
    return max(0.0, float(-(p * np.log(p)).sum() / np.log(9)))  # never -0.0


def score_generations(prompts: list[str], images: np.ndarray) -> dict[str, float]:
    """Detector agreement of generated uint8 images ``(N, 32, 32, 3)`` with their prompts.

    Returns fractions ``colour``, ``shape``, ``background`` (over prompts stating the attribute;
    ``colour`` over one-colour prompts), ``two_tone`` (two-tone prompts: both halves' colours right),
    ``position`` (prompts stating a position: detected cell == stated cell) and
    ``position_entropy`` (:func:`position_entropy` of the detected cells of the prompts stating
    no position; images without a detected object count as misses everywhere).
    """
    hits = {"colour": [], "shape": [], "background": [], "position": [], "two_tone": []}
    free_cells = []
    for prompt, img in zip(prompts, images, strict=True):
        want = parse_caption(prompt)
        got = detect(img)
        if want["colour2"] is not None:
            hits["two_tone"].append(half_colours(img, got) == (want["colour"], want["colour2"]))
        for key in ("colour", "shape", "background"):
            if want[key] is not None and not (key == "colour" and want["colour2"] is not None):
                hits[key].append(getattr(got, key) == want[key])
        if want["row"] is not None:
            hits["position"].append((got.row, got.col) == (want["row"], want["col"]))
        elif got.row is not None:
            free_cells.append((got.row, got.col))
    figures = {key: float(np.mean(v)) if v else float("nan") for key, v in hits.items()}
    figures["position_entropy"] = position_entropy(free_cells)
    return figures
