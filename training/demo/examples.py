"""The README's example images and questions for the demo base model; asking the model about a local image.

Contract:
- `EXAMPLES` names each example image (drawn by `training.demo.synthetic.draw_scene` at 256 px), the natural
  questions the README may send with it, and the answers a correct model gives. `write_examples(dir)` writes
  the PNGs.
- `ask(frozen, image, question)` answers one question about one image through the serving code path
  (`training.demo.eval.answer`: the processor's chat template, `m2pt.forward`, greedy decoding).
- `load_image(path)` opens a local PNG/JPEG/WEBP as RGB (other formats are refused with `DemoImageError`).
- `record_answers(frozen, dir)` returns what the model answers for every example question (for the README).
This module does NOT train and does NOT serve HTTP; local paths are for the command line only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from training.demo.synthetic import draw_scene

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_IMAGE_PIXELS = 4096 * 4096

COLOR_Q = "What color is the shape?"
SHAPE_Q = "What shape is this?"
WHERE_Q = "Where is the shape?"
COUNT_Q = "How many shapes are there?"


class DemoImageError(ValueError):
    """A local image that cannot be used (missing, not PNG/JPEG/WEBP, too large)."""


@dataclass(frozen=True)
class DemoExample:
    """One README example: file name, what is drawn, and question -> expected answer."""

    filename: str
    scene: tuple[tuple[str, str, int | None], ...]
    expected: tuple[tuple[str, str], ...]


EXAMPLES: tuple[DemoExample, ...] = (
    DemoExample(
        "red_circle.png",
        (("circle", "red", None),),
        ((COLOR_Q, "red"), (SHAPE_Q, "circle"), (WHERE_Q, "center"), (COUNT_Q, "1")),
    ),
    DemoExample(
        "green_triangle.png",
        (("triangle", "green", None),),
        ((COLOR_Q, "green"), (SHAPE_Q, "triangle"), ("What colour is the ball?", "green")),
    ),
    DemoExample(
        "blue_square_top_left.png",
        (("square", "blue", 0),),
        ((COLOR_Q, "blue"), (WHERE_Q, "top left"), ("Which cell is the shape in?", "1"), (COUNT_Q, "1")),
    ),
    DemoExample(
        "three_shapes.png",
        (("circle", "yellow", 2), ("square", "purple", 4), ("triangle", "orange", 6)),
        ((COUNT_Q, "3"),),
    ),
)


def write_examples(out_dir: str | Path, size: int = 256) -> list[Path]:
    """Draw every example image into `out_dir` (PNG); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, example in enumerate(EXAMPLES):
        path = out / example.filename
        draw_scene(list(example.scene), size=size, seed=index).save(path, format="PNG")
        paths.append(path)
    return paths


def load_image(path: str | Path) -> Image.Image:
    """Open a local PNG/JPEG/WEBP file as RGB."""
    file = Path(path)
    if not file.is_file():
        raise DemoImageError(f"no image file at {file}; pass the path of a PNG, JPEG or WEBP file")
    try:
        with Image.open(file, formats=list(ALLOWED_FORMATS)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DemoImageError(f"{file} is {image.width}×{image.height}; use an image of at most 16 MP")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DemoImageError(f"{file} is not a readable PNG, JPEG or WEBP image ({exc})") from exc


def ask(frozen, image: Image.Image, question: str) -> str:
    """The model's greedy answer to one question about one image."""
    from training.demo.eval import answer

    return answer(frozen, [image], [question])[0]


def record_answers(frozen, examples_dir: str | Path) -> list[dict]:
    """For every example image: each question, the expected answer and the model's answer."""
    records = []
    for example in EXAMPLES:
        image = load_image(Path(examples_dir) / example.filename)
        for question, expected in example.expected:
            got = ask(frozen, image, question)
            records.append(
                {"image": example.filename, "question": question, "expected": expected, "answer": got}
            )
    return records
