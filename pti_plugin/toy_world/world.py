"""The toy world (v2): procedural 32x32 scenes of one shape on a plain background.

A scene is one object — a ``shape`` in a ``colour``, or *two-tone*: its top half in ``colour``
and its bottom half in ``colour2`` — centred near one cell of a 3x3 grid (plus a small jitter)
on a ``background`` colour. Captions describe it in lower-case words that the word-level
tokenizer (:mod:`pti_plugin.models.word_vocab`) keeps as single tokens, e.g.
``a red circle at the top left on a white background`` or, two-tone (top colour first),
``a orange blue square at the top left on a white background``. Captions randomly omit
attributes (the position in a quarter of them) so that a model trained on them draws an unasked
attribute at random, and some carry the project's template prefix ``an anime illustration of``.

The *character* used by PTI is a new combination of known parts: an orange-over-blue disc
(:data:`HELD_OUT_TWO_TONE`: pretraining shows orange-over-blue squares and triangles and discs
of every other pair, never this one) plus one private detail pretraining never shows: a small
white dot at its centre (:data:`DETAIL_SIZE`). :func:`write_character_dataset` writes a
kohya-style fine-tuning folder of it at a few fixed cells (:data:`CHARACTER_CELLS`), chosen so
that no row or column word covers two of them.

All images are ``uint8`` arrays of shape ``(32, 32, 3)`` (rows = y, top first; columns = x).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 215, 20),
    "purple": (150, 40, 190),
    "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
#: Pixel coordinate of the centre of grid cell 0, 1, 2 (same for x and y).
CELL_CENTRES = (7.0, 16.0, 25.0)
#: Object size range in pixels (side of the square, diameter of the circle, base/height of the
#: triangle) and the maximal centre jitter in pixels along each axis.
SIZE_RANGE = (10.0, 12.0)
JITTER = 1.0
#: Generic words that stand for "the object" when a caption omits the shape.
GENERIC_OBJECT_WORDS = ("shape", "object", "character")
TEMPLATE_PREFIX = "an anime illustration of"


#: The character: top-half and bottom-half colours, and the fixed (row, column) cells at which
#: the fine-tuning set shows it (it is never shown elsewhere). No two cells share a row or a
#: column, so no single position word of the world describes two of them.
CHARACTER_COLOURS = ((250, 135, 20), (30, 70, 230))
CHARACTER_SIZE = 12.0
CHARACTER_CELLS = ((0, 0), (1, 2), (2, 1))
#: The character's private detail: a white dot of this diameter (px) at its centre.
DETAIL_SIZE = 3.0
DETAIL_COLOUR = (255, 255, 255)
#: Fraction of pretraining scenes that are two-tone, and the (top, bottom, shape) combination
#: pretraining never shows (the character's coarse look).
TWO_TONE_FRACTION = 0.25
HELD_OUT_TWO_TONE = ("orange", "blue", "circle")


def two_tone_combinations() -> list[tuple[str, str, str]]:
    """Every (top colour, bottom colour, shape) pretraining shows: distinct colours, minus the held-out one."""
    return [
        (top, bottom, shape)
        for top in COLOURS
        for bottom in COLOURS
        for shape in SHAPES
        if top != bottom and (top, bottom, shape) != HELD_OUT_TWO_TONE
    ]


def _look_names() -> dict[tuple[str, str, str], str]:
    """A made-up one-token name (consonant-vowel-consonant-vowel, e.g. ``kavo``) for every two-tone
    combination pretraining shows; deterministic. The held-out combination has none."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    pool = sorted(c1 + v1 + c2 + v2 for c1 in consonants for v1 in vowels for c2 in consonants for v2 in vowels)
    combos = two_tone_combinations()
    picks = np.random.default_rng(2026).choice(len(pool), size=len(combos), replace=False)
    return {combo: pool[int(k)] for combo, k in zip(combos, picks)}


#: World v2's look names: a two-tone object can be captioned by its name alone (``a kavo at the top
#: left``), as a real vocabulary names composite looks ("tiger") with one word. Used only when the
#: caption probability ``name_look`` is above 0 (the recipe's ``name_caption_phases``).
LOOK_NAMES: dict[tuple[str, str, str], str] = _look_names()
_NAMED_LOOKS = {name: combo for combo, name in LOOK_NAMES.items()}

#: Every word a caption of this module can contain (the toy tokenizer's vocabulary).
WORDS = tuple(
    sorted(
        set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(ROWS) | set(COLUMNS)
        | set(GENERIC_OBJECT_WORDS) | set(LOOK_NAMES.values())
        | {"a", "an", "anime", "illustration", "of", "at", "the", "on", "background"}
    )
)

#: Default probabilities with which :func:`make_caption` omits an attribute / adds the prefix.
CAPTION_PROBS = {
    "drop_position": 0.25,
    "drop_background": 0.15,
    "drop_colour": 0.10,
    "drop_shape": 0.10,
    "drop_article": 0.15,
    "prefix": 0.30,
    "name_look": 0.0,  # a two-tone object captioned by its name (LOOK_NAMES) instead of colours and shape
}

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One scene. ``cx, cy`` is the object's bounding-box centre in pixels (x right, y down)."""

    shape: str
    colour: str
    background: str
    row: int
    col: int
    cx: float
    cy: float
    size: float
    colour2: str | None = None  # bottom-half colour of a two-tone object (``colour`` is the top)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a one-colour scene uniformly over shapes, colours, backgrounds and cells, with jitter and size."""
    row, col = int(rng.integers(3)), int(rng.integers(3))
    return Scene(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
        row=row,
        col=col,
        cx=CELL_CENTRES[col] + float(rng.uniform(-JITTER, JITTER)),
        cy=CELL_CENTRES[row] + float(rng.uniform(-JITTER, JITTER)),
        size=float(rng.uniform(*SIZE_RANGE)),
    )


def sample_pretraining_scene(rng: np.random.Generator, two_tone_fraction: float = TWO_TONE_FRACTION) -> Scene:
    """A pretraining scene: two-tone with probability ``two_tone_fraction`` (never the held-out
    combination), else one-colour as :func:`sample_scene`."""
    scene = sample_scene(rng)
    if float(rng.random()) >= two_tone_fraction:
        return scene
    combos = two_tone_combinations()
    top, bottom, shape = combos[int(rng.integers(len(combos)))]
    return dataclasses.replace(scene, shape=shape, colour=top, colour2=bottom)


def shape_coverage(shape: str, cx: float, cy: float, size: float, supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by ``shape``: float32 array ``(32, 32)`` in [0, 1].

    Pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)``; coverage is estimated on a
    ``supersample x supersample`` sub-grid (1 gives a hard mask sampled at pixel centres).
    """
    n = IMAGE_SIZE * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    half = size / 2.0
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":  # apex up, base at the bottom; height = base = size
        depth = (y - (cy - half)) / size  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(IMAGE_SIZE, supersample, IMAGE_SIZE, supersample).mean(axis=(1, 3)).astype(np.float32)


def _composite(background: tuple[int, int, int], layers: list[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    """Paint coverage layers ``(alpha (32, 32), rgb)`` in order over a plain background -> uint8 image."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = background
    for alpha, rgb in layers:
        a = alpha[..., None]
        img = img * (1.0 - a) + np.asarray(rgb, dtype=np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def upper_half(cy: float) -> np.ndarray:
    """Coverage float32 ``(32, 32)`` of the half-plane above ``y = cy`` (the top of a two-tone object)."""
    return shape_coverage("square", IMAGE_SIZE / 2, cy - IMAGE_SIZE, 2 * IMAGE_SIZE)


def render_scene(scene: Scene) -> np.ndarray:
    """Render ``scene`` as an anti-aliased uint8 image ``(32, 32, 3)``."""
    cov = shape_coverage(scene.shape, scene.cx, scene.cy, scene.size)
    if scene.colour2 is None:
        return _composite(BACKGROUNDS[scene.background], [(cov, COLOURS[scene.colour])])
    layers = [(cov, COLOURS[scene.colour2]), (cov * upper_half(scene.cy), COLOURS[scene.colour])]
    return _composite(BACKGROUNDS[scene.background], layers)


def position_phrase(row: int, col: int) -> str:
    """``at the <row> <column>``, e.g. ``at the top left``, ``at the middle center``."""
    return f"at the {ROWS[row]} {COLUMNS[col]}"


def make_caption(scene: Scene, rng: np.random.Generator | None = None, probs: dict[str, float] | None = None) -> str:
    """Caption of ``scene``; with ``rng``, attributes are dropped at random per ``probs``.

    Full form: ``[an anime illustration of] a <colour> [<colour2>] <shape> at the <row> <col> on a <bg> background``
    (two-tone: top colour, then bottom colour; a dropped colour drops both). With probability
    ``name_look`` a two-tone object is named instead: ``[an anime illustration of] a <name> at ...``
    (:data:`LOOK_NAMES`; colour and shape drops do not apply). Without ``rng`` the full caption (no prefix) is returned. A dropped shape becomes a generic
    word (``shape``/``object``/``character``); a dropped article drops the leading ``a``.
    """
    p = {k: 0.0 for k in CAPTION_PROBS} if rng is None else {**CAPTION_PROBS, **(probs or {})}

    def happens(key: str) -> bool:
        return rng is not None and p[key] > 0 and float(rng.random()) < p[key]

    if scene.colour2 is not None and happens("name_look"):
        words = ([] if happens("drop_article") else ["a"]) + [LOOK_NAMES[(scene.colour, scene.colour2, scene.shape)]]
        return _finish_caption(scene, words, happens)
    noun = scene.shape
    if happens("drop_shape"):
        noun = GENERIC_OBJECT_WORDS[int(rng.integers(len(GENERIC_OBJECT_WORDS)))]
    words = [] if happens("drop_article") else ["a"]
    if not happens("drop_colour"):
        words.append(scene.colour)
        if scene.colour2 is not None:
            words.append(scene.colour2)
    words.append(noun)
    return _finish_caption(scene, words, happens)


def _finish_caption(scene: Scene, words: list[str], happens) -> str:
    """``words`` (article and object) with the position, background and prefix, each unless dropped."""
    if not happens("drop_position"):
        words.append(position_phrase(scene.row, scene.col))
    if not happens("drop_background"):
        words.append(f"on a {scene.background} background")
    text = " ".join(words)
    if happens("prefix"):
        text = f"{TEMPLATE_PREFIX} {text}"
    return text


def parse_caption(text: str) -> dict[str, str | int | None]:
    """Attributes stated by a caption or prompt: keys ``shape colour background row col``.

    Values are the attribute (``row``/``col`` as grid indices 0..2) or ``None`` when the text does
    not state it; ``colour2`` is the bottom colour of a two-tone object (two colour words in a row:
    ``colour`` is then the top one); a look name (:data:`LOOK_NAMES`) states both colours and the
    shape. Generic object words and the template prefix are ignored.
    """
    words = text.lower().split()
    out: dict[str, str | int | None] = {
        "shape": None, "colour": None, "colour2": None, "background": None, "row": None, "col": None
    }
    for i, w in enumerate(words):
        if w in _NAMED_LOOKS:
            out["colour"], out["colour2"], out["shape"] = _NAMED_LOOKS[w]
        elif w in SHAPES:
            out["shape"] = w
        elif w == "background" and i > 0 and words[i - 1] in BACKGROUNDS:
            out["background"] = words[i - 1]
        elif w in COLOURS and i > 0 and words[i - 1] in COLOURS:
            out["colour2"] = w
        elif w in COLOURS:
            out["colour"] = w
        elif w in ROWS and i + 1 < len(words) and words[i + 1] in COLUMNS:
            out["row"], out["col"] = ROWS.index(w), COLUMNS.index(words[i + 1])
    return out


def render_character(
    cx: float, cy: float, background: str = "white", size: float = CHARACTER_SIZE, detail: bool = True
) -> np.ndarray:
    """The character at bounding-box centre ``(cx, cy)``: a disc with a top and a bottom colour
    and (``detail``) the white dot at its centre. Returns a uint8 image ``(32, 32, 3)``."""
    disc = shape_coverage("circle", cx, cy, size)
    layers = [(disc, CHARACTER_COLOURS[1]), (disc * upper_half(cy), CHARACTER_COLOURS[0])]
    if detail:
        layers.append((shape_coverage("circle", cx, cy, DETAIL_SIZE), DETAIL_COLOUR))
    return _composite(BACKGROUNDS[background], layers)


def write_character_dataset(
    out_dir: str | Path, num_images: int = 6, seed: int = 0, token: str = "tok1", repeats: int = 10
) -> Path:
    """Write a kohya-style fine-tuning folder of the character; returns ``out_dir``.

    Layout: ``out_dir/<repeats>_<token>/NNN.png`` (32x32 RGB) with ``NNN.txt`` captions. Image
    ``k`` shows the character at cell ``CHARACTER_CELLS[k % 3]`` with at most ``JITTER`` px of
    jitter, on a white background except every third image from the fourth on (gray). Captions
    never state the position: most are ``an anime illustration of <token>``, the others
    ``<token> on a <bg> background``. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(out_dir) / f"{repeats}_{token}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(num_images):
        row, col = CHARACTER_CELLS[k % len(CHARACTER_CELLS)]
        background = "gray" if k % 3 == 2 and k >= 3 else "white"
        cx = CELL_CENTRES[col] + float(rng.uniform(-JITTER, JITTER))
        cy = CELL_CENTRES[row] + float(rng.uniform(-JITTER, JITTER))
        Image.fromarray(render_character(cx, cy, background)).save(folder / f"{k:03d}.png")
        if k % 2 == 0:
            caption = f"{TEMPLATE_PREFIX} {token}"
        else:
            caption = f"{token} on a {background} background"
        (folder / f"{k:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return Path(out_dir)


def bench_data_dir(out: str | Path) -> Path:
    """Where the research bench keeps its character folder under the working folder ``out`` (nothing is
    written; a preset names it before the folder exists)."""
    return Path(out) / "data"


def bench_dataset(out: str | Path) -> Path:
    """The research bench's character folder (:func:`bench_data_dir`), written by
    :func:`write_character_dataset` the first time a stage of the bench runs under ``out`` and reused
    after; returns it."""
    data_dir = bench_data_dir(out)
    if not data_dir.is_dir():
        write_character_dataset(data_dir)
    return data_dir


def quality_prompts(n: int, seed: int = 1234) -> tuple[list[str], list[int]]:
    """``n`` evaluation prompts and their generation seeds, deterministic in ``seed``.

    Even-indexed prompts state a position (cycling through the 9 cells), odd-indexed ones do not;
    colour, shape and background are random; every fourth prompt carries the template prefix.
    Form: ``[an anime illustration of] a <colour> <shape> [at the <row> <col>] on a <bg> background``.
    """
    rng = np.random.default_rng(seed)
    prompts, seeds = [], []
    for k in range(n):
        scene = sample_scene(rng)
        cell = (k // 2) % 9
        scene = Scene(scene.shape, scene.colour, scene.background, cell // 3, cell % 3, scene.cx, scene.cy, scene.size)
        text = f"a {scene.colour} {scene.shape}"
        if k % 2 == 0:
            text += " " + position_phrase(scene.row, scene.col)
        text += f" on a {scene.background} background"
        if k % 4 == 3:
            text = f"{TEMPLATE_PREFIX} {text}"
        prompts.append(text)
        seeds.append(int(rng.integers(2**31)))
    return prompts, seeds


def two_tone_prompts(n: int, seed: int = 4321, named: bool = False) -> tuple[list[str], list[int]]:
    """``n`` prompts of two-tone combinations pretraining shows, and their generation seeds.

    Form: ``a <top> <bottom> <shape> [at the <row> <col>] on a <bg> background`` (every other
    prompt states a cell); deterministic in ``seed``. ``named``: the same scenes and seeds with the
    object stated by its look name (``a <name> ...``, :data:`LOOK_NAMES`).
    """
    rng = np.random.default_rng(seed)
    combos = two_tone_combinations()
    prompts, seeds = [], []
    for k in range(n):
        top, bottom, shape = combos[int(rng.integers(len(combos)))]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        text = f"a {LOOK_NAMES[(top, bottom, shape)]}" if named else f"a {top} {bottom} {shape}"
        if k % 2 == 0:
            cell = int(rng.integers(9))
            text += " " + position_phrase(cell // 3, cell % 3)
        prompts.append(f"{text} on a {background} background")
        seeds.append(int(rng.integers(2**31)))
    return prompts, seeds


#: Prompts for leakage scoring that state no position and are not the character set's captions
#: (``{}`` is the token): the model should draw the character anywhere.
NEUTRAL_TEMPLATES = (
    "a {}",
    "a {} on a black background",
    "a {} on a gray background",
    "an anime illustration of a {} on a white background",
)
