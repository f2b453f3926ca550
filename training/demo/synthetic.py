"""Synthetic image-instruction data for the demo base model: drawn with PIL, generated on the fly from a seed.

Contract:
- `sample(task, rng)` draws one `Example` (a PIL RGB image, a natural question, its exact answer, the task
  name); the same `random.Random` state always gives the same example. `make_examples(tasks, n, seed)` gives
  `n` examples per task, interleaved; example `i` of a task depends only on (seed, task, i), not on the other
  tasks asked for.
- Images are drawn LARGER than the model input (96 px by default) on a black canvas laid out as a 3×3 grid.
  The model's own image processor resizes them (the one the server uses), so training and serving see
  identical preprocessing. Nothing here resizes, normalises or tokenises.
- Questions are natural phrasings (several per task, with a free noun and optional "in the image" parts);
  answers are natural words ("red", "circle", "top left", "2"). The tokenizer lowercases and splits
  punctuation off, so the phrasings here are written lowercase with spaced punctuation, exactly as they will
  be tokenised.
- `vocabulary()` lists every word a task, phrasing or answer uses, plus `RESERVED_WORDS`, in a fixed order.

Pretraining tasks (`TASKS`): colour, shape (of one big shape), where (position words), cell (grid cell 1–9),
count (0–3 small shapes) and stroke (line orientation). Between them the answers use every digit 0–9, so the
language-model head already speaks digits before anyone prompt-tunes the base on handwritten digits.

Reserved for later tasks (never used by a pretraining question or answer; only in the tokenizer so that a
prompt-tuned bundle can read them):
- handwritten digits (scikit-learn `digits`, done by the training module): `DIGIT_QUESTIONS` such as
  "what digit is this ?", answers "0".."9" (digits the base already speaks, on images it has never seen).
- `HELD_OUT_TASKS`, generated here, never mixed into pretraining:
  - `size`: "is the shape big or small ?" -> big / small (new answer words: the hardest kind of new task),
  - `side`: "which side is the shape on ?" -> left / right (a new question over answer words the base speaks),
  - `half`: "is the shape in the upper or lower half ?" -> upper / lower (new question and new answer words).
- `pattern` and a few synonyms (`large`, `tiny`, `numeral`) are kept free for tasks nobody has written yet.
This module does NOT load sklearn digits, train anything, or know about token ids.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw


class UnknownTaskError(ValueError):
    """A task name that is neither a pretraining task (`TASKS`) nor a held-out one (`HELD_OUT_TASKS`)."""


@dataclass
class Example:
    """One image-instruction pair. `question` and `answer` are lowercase words separated by spaces."""

    image: Image.Image
    question: str
    answer: str
    task: str


DEFAULT_SIZE = 96
GRID = 3

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 180, 50),
    "blue": (45, 80, 235),
    "yellow": (235, 220, 40),
    "purple": (150, 55, 205),
    "orange": (245, 140, 25),
    "white": (240, 240, 240),
}
SHAPES = ["circle", "square", "triangle"]
# Grid cells in reading order (cell 1 is top left, cell 9 bottom right).
POSITIONS = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
]
STROKES = ["horizontal", "vertical", "diagonal up", "diagonal down"]
MAX_COUNT = 3
BIG_SHARE = 0.2  # share of `where` examples (and of one-shape `count` ones) that show one big central shape

NOUNS = ["shape", "object", "thing", "figure"]
PLURALS = ["shapes", "objects", "things", "figures"]
IN_IMAGE = ["", "", "", " in the image", " in the picture", " in this image", " here"]
LEADS = ["", "", "", "", "please tell me ", "tell me ", "can you tell me "]

# Words a synonym-free question can lose without changing its meaning; demo_base may swap them for <unk> so
# the model learns to shrug off words it does not know.
FILLER_WORDS = frozenset(
    ["object", "thing", "figure", "objects", "things", "figures", "image", "picture", "please"]
)

_PHRASES: dict[str, list[str]] = {
    "color": [
        "what color is the {noun}{in} ?",
        "what colour is the {noun}{in} ?",
        "what color is it ?",
        "what color is this {noun} ?",
        "what is the color of the {noun}{in} ?",
        "which color is the {noun} ?",
        "what ' s the colour of the {noun} ?",
        "color of the {noun}{in} ?",
        "what color do you see{in} ?",
    ],
    "shape": [
        "what shape is this ?",
        "what shape is it ?",
        "what shape is the {noun}{in} ?",
        "what is the shape{in} ?",
        "which shape is shown{in} ?",
        "what kind of shape is this ?",
        "what shape do you see{in} ?",
        "name the shape{in} .",
        "what ' s the shape of the {noun} ?",
    ],
    "where": [
        "where is the {noun}{in} ?",
        "where is it ?",
        "where is the {noun} located ?",
        "where is this {noun} ?",
        "what is the position of the {noun}{in} ?",
        "in which part of the image is the {noun} ?",
        "where do you see the {noun} ?",
        "what ' s the location of the {noun} ?",
    ],
    "cell": [
        "which cell is the {noun} in ?",
        "in which cell is the {noun} ?",
        "what cell is the {noun} in ?",
        "which grid cell is the {noun} in ?",
        "which cell of the grid holds the {noun} ?",
    ],
    "count": [
        "how many {nouns} are there{in} ?",
        "how many {nouns} are in the image ?",
        "how many {nouns} ?",
        "how many {nouns} do you see{in} ?",
        "count the {nouns}{in} .",
        "what is the count of {nouns}{in} ?",
        "how many {nouns} can you see ?",
    ],
    "stroke": [
        "which way does the line go ?",
        "what direction is the line{in} ?",
        "how is the line oriented ?",
        "what kind of line is this ?",
        "what is the direction of the line{in} ?",
        "which way is the line drawn ?",
    ],
}

# Phrasings of the held-out tasks and of the handwritten-digit task. Never used in pretraining.
HELD_OUT_PHRASES: dict[str, list[str]] = {
    "size": ["is the {noun} big or small ?", "what size is the {noun} ?", "how big is the {noun}{in} ?"],
    "side": [
        "which side is the {noun} on ?",
        "is the {noun} on the left or the right ?",
        "on which side is the {noun} ?",
    ],
    "half": ["is the {noun} in the upper or lower half ?", "which half is the {noun} in ?"],
}
DIGIT_QUESTIONS = [
    "what digit is this ?",
    "what digit is shown ?",
    "which digit is written here ?",
    "what number is this ?",
    "what handwritten digit is this ?",
    "read the digit .",
    "what is the digit in the image ?",
    "which numeral is it ?",
]
RESERVED_WORDS = [
    "digit",
    "digits",
    "number",
    "numeral",
    "handwritten",
    "written",
    "read",
    "size",
    "big",
    "small",
    "large",
    "tiny",
    "side",
    "half",
    "upper",
    "lower",
    "or",
    "on",
    "pattern",
]

_LEAD_OK = ("what", "which", "where", "how", "is ")
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """Split text the way the demo tokenizer does (lowercase; runs of word characters or of punctuation)."""
    return _WORD_RE.findall(text.lower())


def _phrase(templates: list[str], rng: random.Random) -> str:
    template = rng.choice(templates)
    text = template.format(noun=rng.choice(NOUNS), nouns=rng.choice(PLURALS), **{"in": rng.choice(IN_IMAGE)})
    lead = rng.choice(
        LEADS
    )  # drawn for every question so that the RNG stream does not depend on the template
    return lead + text if text.startswith(_LEAD_OK) else text


def _jitter_color(name: str, rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[name])
    return r, g, b


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
):
    """Draw `kind` centred at (cx, cy) with half-extent `r` (pixels)."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        h = r * 0.88  # about the circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    return image, ImageDraw.Draw(image)


def _small_in_cell(
    draw, cell: int, size: int, rng: random.Random, kind: str | None = None, color: str | None = None
):
    """A small shape inside grid cell `cell` (0..8), jittered but never leaving the cell."""
    unit = size / GRID
    row, col = divmod(cell, GRID)
    r = unit * rng.uniform(0.28, 0.36)
    slack = unit / 2 - r - unit * 0.04
    cx = (col + 0.5) * unit + rng.uniform(-slack, slack)
    cy = (row + 0.5) * unit + rng.uniform(-slack, slack)
    _draw_shape(
        draw, kind or rng.choice(SHAPES), cx, cy, r, _jitter_color(color or rng.choice(list(COLORS)), rng)
    )


def _big(draw, size: int, rng: random.Random, kind: str, color: str) -> None:
    r = size * rng.uniform(0.30, 0.38)
    shift = size * 0.04
    cx, cy = size / 2 + rng.uniform(-shift, shift), size / 2 + rng.uniform(-shift, shift)
    _draw_shape(draw, kind, cx, cy, r, _jitter_color(color, rng))


def _color(rng: random.Random, size: int) -> Example:
    image, draw = _canvas(size)
    color = rng.choice(list(COLORS))
    if rng.random() < 0.5:
        _big(draw, size, rng, rng.choice(SHAPES), color)
    else:
        _small_in_cell(draw, rng.randrange(GRID * GRID), size, rng, color=color)
    return Example(image, _phrase(_PHRASES["color"], rng), color, "color")


def _shape(rng: random.Random, size: int) -> Example:
    image, draw = _canvas(size)
    kind = rng.choice(SHAPES)
    _big(draw, size, rng, kind, rng.choice(list(COLORS)))
    return Example(image, _phrase(_PHRASES["shape"], rng), kind, "shape")


def _where(rng: random.Random, size: int) -> Example:
    """One small shape in a grid cell; now and then one big central shape (answer "center")."""
    image, draw = _canvas(size)
    if rng.random() < BIG_SHARE:
        _big(draw, size, rng, rng.choice(SHAPES), rng.choice(list(COLORS)))
        cell = GRID * GRID // 2
    else:
        cell = rng.randrange(GRID * GRID)
        _small_in_cell(draw, cell, size, rng)
    return Example(image, _phrase(_PHRASES["where"], rng), POSITIONS[cell], "where")


def _cell(rng: random.Random, size: int) -> Example:
    image, draw = _canvas(size)
    cell = rng.randrange(GRID * GRID)
    _small_in_cell(draw, cell, size, rng)
    return Example(image, _phrase(_PHRASES["cell"], rng), str(cell + 1), "cell")


def _count(rng: random.Random, size: int) -> Example:
    """0..3 small shapes in distinct cells; a single shape is now and then drawn big."""
    image, draw = _canvas(size)
    k = rng.randint(0, MAX_COUNT)
    if k == 1 and rng.random() < BIG_SHARE:
        _big(draw, size, rng, rng.choice(SHAPES), rng.choice(list(COLORS)))
    else:
        for cell in rng.sample(range(GRID * GRID), k):
            _small_in_cell(draw, cell, size, rng)
    return Example(image, _phrase(_PHRASES["count"], rng), str(k), "count")


def _stroke(rng: random.Random, size: int) -> Example:
    image, draw = _canvas(size)
    kind = rng.choice(STROKES)
    lo, hi = size * rng.uniform(0.1, 0.2), size * rng.uniform(0.8, 0.9)
    off = size * rng.uniform(-0.2, 0.2)
    mid = size / 2 + off
    off *= 0.5  # diagonals shift along their normal by off·√2; keep them inside the canvas
    ends = {
        "horizontal": (lo, mid, hi, mid),
        "vertical": (mid, lo, mid, hi),
        "diagonal up": (lo + off, hi + off, hi + off, lo + off),
        "diagonal down": (lo + off, lo - off, hi + off, hi - off),
    }[kind]
    width = max(1, round(size * rng.uniform(0.06, 0.1)))
    draw.line(ends, fill=_jitter_color(rng.choice(list(COLORS)), rng), width=width)
    return Example(image, _phrase(_PHRASES["stroke"], rng), kind, "stroke")


def _size(rng: random.Random, size: int) -> Example:
    image, draw = _canvas(size)
    big = rng.random() < 0.5
    if big:
        _big(draw, size, rng, rng.choice(SHAPES), rng.choice(list(COLORS)))
    else:
        _small_in_cell(draw, rng.randrange(GRID * GRID), size, rng)
    return Example(image, _phrase(HELD_OUT_PHRASES["size"], rng), "big" if big else "small", "size")


def _side(rng: random.Random, size: int) -> Example:
    image, draw = _canvas(size)
    col = rng.choice([0, GRID - 1])
    _small_in_cell(draw, rng.randrange(GRID) * GRID + col, size, rng)
    return Example(image, _phrase(HELD_OUT_PHRASES["side"], rng), "left" if col == 0 else "right", "side")


def _half(rng: random.Random, size: int) -> Example:
    image, draw = _canvas(size)
    row = rng.choice([0, GRID - 1])
    _small_in_cell(draw, row * GRID + rng.randrange(GRID), size, rng)
    return Example(image, _phrase(HELD_OUT_PHRASES["half"], rng), "upper" if row == 0 else "lower", "half")


Generator = Callable[[random.Random, int], Example]

TASKS: dict[str, Generator] = {
    "color": _color,
    "shape": _shape,
    "where": _where,
    "cell": _cell,
    "count": _count,
    "stroke": _stroke,
}
HELD_OUT_TASKS: dict[str, Generator] = {"size": _size, "side": _side, "half": _half}


def _generator(task: str) -> Generator:
    if task in TASKS:
        return TASKS[task]
    if task in HELD_OUT_TASKS:
        return HELD_OUT_TASKS[task]
    known = ", ".join(list(TASKS) + list(HELD_OUT_TASKS))
    raise UnknownTaskError(f"unknown synthetic task {task!r}; choose one of: {known}")


def sample(task: str, rng: random.Random, size: int = DEFAULT_SIZE) -> Example:
    """Draw one example of `task` (a pretraining or held-out task) at `size`×`size` pixels."""
    if not isinstance(size, int) or size < 24:
        raise ValueError(f"image size must be an int of at least 24 pixels, got {size!r}")
    return _generator(task)(rng, size)


def example_rng(seed: int, task: str, index: int) -> random.Random:
    """The RNG of example `index` of `task` under `seed` (string seeding is stable across processes)."""
    return random.Random(f"m2pt-synthetic:{seed}:{task}:{index}")


def make_examples(tasks: list[str], n: int, seed: int, size: int = DEFAULT_SIZE) -> list[Example]:
    """`n` examples of every task in `tasks`, interleaved (t1, t2, ..., t1, t2, ...). Deterministic per
    seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for task in tasks:
        _generator(task)
    return [sample(task, example_rng(seed, task, i), size) for i in range(n) for task in tasks]


def draw_scene(items: list[tuple[str, str, int | None]], size: int = 256, seed: int = 0) -> Image.Image:
    """Draw chosen shapes as the generator would: `(shape, colour, cell)` with cell 0..8 for a small shape in
    that grid cell (reading order) or None for one big central shape. Used for the README example images."""
    rng = random.Random(f"m2pt-scene:{seed}")
    image, draw = _canvas(size)
    for kind, color, cell in items:
        if kind not in SHAPES or color not in COLORS:
            raise ValueError(
                f"unknown shape {kind!r} or colour {color!r}; shapes {SHAPES}, colours {list(COLORS)}"
            )
        if cell is None:
            _big(draw, size, rng, kind, color)
        elif 0 <= cell < GRID * GRID:
            _small_in_cell(draw, cell, size, rng, kind=kind, color=color)
        else:
            raise ValueError(f"cell must be 0..{GRID * GRID - 1} or None, got {cell!r}")
    return image


def _template_words(templates: list[str]) -> list[str]:
    words: list[str] = []
    for template in templates:
        words += words_of(template.replace("{noun}", "").replace("{nouns}", "").replace("{in}", ""))
    return words


def pretraining_words() -> list[str]:
    """Every word a pretraining question or answer can contain, in a fixed order."""
    words: list[str] = []
    for templates in _PHRASES.values():
        words += _template_words(templates)
    for part in NOUNS + PLURALS + IN_IMAGE + LEADS:
        words += words_of(part)
    for answer in list(COLORS) + SHAPES + POSITIONS + STROKES + [str(d) for d in range(10)]:
        words += words_of(answer)
    return list(dict.fromkeys(words))


def vocabulary() -> list[str]:
    """Every word any task, phrasing or answer uses, then the reserved words; fixed order, no duplicates."""
    words = pretraining_words()
    for templates in HELD_OUT_PHRASES.values():
        words += _template_words(templates)
    words += (
        _template_words(DIGIT_QUESTIONS)
        + ["big", "small", "left", "right", "upper", "lower"]
        + RESERVED_WORDS
    )
    return list(dict.fromkeys(words))
