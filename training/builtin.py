"""Built-in datasets as `Record`s: scikit-learn's handwritten digits and the synthetic shape tasks.

- `digits`: `sklearn.datasets.load_digits` (1,797 real 8x8 scans), drawn white on black and upscaled with
  NEAREST to a multiple of 8 px. A fixed permutation (seed 0, independent of any training seed) splits it into
  1,297 train and 500 test images; `digits` / `digits:train` is the train part and `digits:test` the test
  part, so training never sees a test image whatever its seed.
- `synthetic:<task>[,<task>...]`: examples drawn by the demo's scene generator `training.demo.synthetic`
  (including its held-out tasks); the train and eval sets are drawn with different seeds.
The built-in datasets are the trainer's one use of the demo package (`training.demo.synthetic`, imported lazily,
allowed by name in tests/test_import_graph.py).

This module builds records only; tokenisation is in `training.data`.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from training.records import IMAGE_TOKEN, DataError, Record

log = logging.getLogger(__name__)

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 500
EVAL_SEED_OFFSET = 1_000_003  # synthetic eval examples use seed + this, so they differ from the train draw


def digits_split(split: str) -> np.ndarray:
    """Indices into `load_digits()` for `train` or `test` (fixed forever: seed 0, last 500 = test)."""
    from sklearn.datasets import load_digits

    total = len(load_digits().target)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(total)
    if split == "train":
        return order[: total - DIGITS_TEST_SIZE]
    if split == "test":
        return order[total - DIGITS_TEST_SIZE :]
    raise DataError(f"digits split must be 'train' or 'test', got {split!r}")


def digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """An 8x8 digit (values 0..16) as an RGB image, white on black, upscaled NEAREST to about `image_size`."""
    scale = max(1, round(image_size / 8))
    gray = (np.clip(pixels, 0, 16) * (255.0 / 16.0)).astype(np.uint8)  # [8, 8]
    img = Image.fromarray(gray, mode="L").resize((8 * scale, 8 * scale), Image.NEAREST)
    return img.convert("RGB")


def digits_records(split: str, image_size: int, limit: int | None = None) -> list[Record]:
    """Digit `i` is asked with phrasing `i mod len(DIGIT_QUESTIONS)` of `training.demo.synthetic` (the phrasings
    the demo base's vocabulary reserves)."""
    from sklearn.datasets import load_digits

    from training.demo.synthetic import DIGIT_QUESTIONS

    data = load_digits()
    indices = digits_split(split)[:limit]
    return [
        Record(
            image=digit_image(data.images[i], image_size),
            turns=[(f"{IMAGE_TOKEN}\n{DIGIT_QUESTIONS[i % len(DIGIT_QUESTIONS)]}", str(int(data.target[i])))],
            source=f"digits:{split}[{i}]",
        )
        for i in indices
    ]


def synthetic_records(tasks: list[str], n: int, seed: int) -> list[Record]:
    """`n` examples of `tasks` from `training.demo.synthetic.make_examples`, as records."""
    from training.demo import synthetic

    known = set(synthetic.TASKS) | set(getattr(synthetic, "HELD_OUT_TASKS", ()))
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise DataError(f"unknown synthetic task(s) {unknown}; available: {', '.join(sorted(known))}")
    examples = synthetic.make_examples(tasks, n, seed)
    records = []
    for i, ex in enumerate(examples):
        image = ex.image if isinstance(ex.image, Image.Image) else Image.fromarray(np.asarray(ex.image))
        records.append(
            Record(
                image=image.convert("RGB"),
                turns=[(f"{IMAGE_TOKEN}\n{ex.question}", ex.answer)],
                source=f"{ex.task}[{i}]",
            )
        )
    return records


def builtin_names() -> str:
    return "digits, digits:train, digits:test, synthetic:<task>[,<task>...]"


def is_builtin(spec: str) -> bool:
    return spec == "digits" or spec.startswith(("digits:", "synthetic:"))


def builtin_records(spec: str, image_size: int, n: int, seed: int, evaluation: bool = False) -> list[Record]:
    """Records for a built-in dataset spec. For `evaluation`, `digits` means its test split and synthetic
    tasks use an eval seed. `n` caps the number of records (digits) or sets it (synthetic)."""
    if spec in ("digits", "digits:train", "digits:test"):
        split = spec.split(":")[1] if ":" in spec else ("test" if evaluation else "train")
        return digits_records(split, image_size, limit=n or None)
    if spec.startswith("synthetic:"):
        tasks = [t.strip() for t in spec.split(":", 1)[1].split(",") if t.strip()]
        if not tasks:
            raise DataError("synthetic dataset needs a task name: synthetic:<task>")
        if n <= 0:
            raise DataError("synthetic datasets need a positive size (--train-size / --eval-size)")
        return synthetic_records(tasks, n, seed + (EVAL_SEED_OFFSET if evaluation else 0))
    raise DataError(f"unknown dataset {spec!r}; use a LLaVA JSON file or one of {builtin_names()}")
