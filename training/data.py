"""Training data for M²PT: records (LLaVA JSON or built-in) tokenised exactly as serving will see them.

Contract:
- A conversation becomes chat messages with `{"type": "image"}` parts and is rendered by the base model's own
  `processor.apply_chat_template`; text and image go through `processor(...)`, so tokens and pixels are the
  ones the server produces for the same question and image.
- Labels are the assistant answers (and the end-of-turn `</s>` the template emits) only; everything else is
  `IGNORE_INDEX`. Labels are aligned with `input_ids` (unshifted); the loss shifts.
- `prompt_len` marks where the last answer starts, so `input_ids[:prompt_len]` is the generation prompt that
  greedy evaluation feeds to the serving path.
- Splits: a JSON file without `--eval-data` holds out a fixed fraction (chosen by a fixed permutation, not by
  the training seed); `digits` evaluates on `digits:test`; synthetic tasks evaluate on a separately seeded
  draw.

This module does not run the model; `training.trainer` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from m2pt.families.base import ImageInput
from training.builtin import builtin_records, is_builtin
from training.records import IMAGE_TOKEN, BadRecord, DataError, OnBad, Record, read_llava_json

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
JSON_SPLIT_SEED = 0
DEFAULT_SYNTHETIC_TRAIN = 2000
DEFAULT_SYNTHETIC_EVAL = 200


@dataclass
class Encoded:
    """One tokenised example."""

    input_ids: Tensor  # [T] long
    labels: Tensor  # [T] long, IGNORE_INDEX except answer tokens
    pixel_values: Tensor  # the (first) image's pixels in the family's layout; LLaVA [3, H, W]
    prompt_len: int  # input_ids[:prompt_len] = prompt of the last answer
    source: str
    images: tuple[ImageInput, ...] = ()  # every image of the example (`family.split_images`), in order

    def image_inputs(self) -> tuple[ImageInput, ...]:
        return self.images or (ImageInput(self.pixel_values),)

    @property
    def answer_ids(self) -> Tensor:
        """The last answer's target tokens (ending with `</s>` when the template emits it). [A]"""
        tail = self.labels[self.prompt_len :]
        return tail[tail != IGNORE_INDEX]


@dataclass
class EncodedDataset:
    name: str
    examples: list[Encoded]
    bad: list[BadRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def target_count(self, indices: list[int]) -> int:
        """How many label positions of these examples enter the loss (labels after the first token)."""
        return sum(int((self.examples[i].labels[1:] != IGNORE_INDEX).sum()) for i in indices)


@dataclass
class Batch:
    """Left-padded batch, laid out as `m2pt.forward.prefill` lays out its rows."""

    input_ids: list[Tensor]  # B x [T_b]
    labels: Tensor  # [B, T] long, left-padded with IGNORE_INDEX
    pixel_values: (
        Tensor | None
    )  # [B, 3, H, W] when every example has one equal-shape image (LLaVA), else None
    images: list[tuple[ImageInput, ...]] = field(default_factory=list)  # per example, in the family's layout


def to_messages(turns: list[tuple[str, str]]) -> list[dict]:
    """[(human, answer), ...] -> chat messages; the `<image>` token becomes an image part in place."""
    messages = []
    for human, answer in turns:
        parts: list[dict] = []
        for k, piece in enumerate(human.split(IMAGE_TOKEN)):
            if k:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": "user", "content": parts})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})
    return messages


def answer_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the character span of each assistant turn (answer + end-of-turn marker)."""
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for k in range(1, len(messages), 2):
        # the prompt as serving renders it (with the generation prompt: Qwen's "<|im_start|>assistant\n"), so an
        # assistant header the template emits is part of the prompt, never a label
        before = processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = processor.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(
                "the chat template does not render conversations prefix-stably; cannot locate answers"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _last_end(offsets) -> int:
    """End (in characters) of the last token that covers text (special tokens have empty spans)."""
    return max(int(e) for s, e in offsets if e > s)


SplitImages = Callable[[Mapping[str, Any]], list[ImageInput]]


def llava_split(encoded: Mapping[str, Any]) -> list[ImageInput]:
    return [ImageInput(px) for px in encoded["pixel_values"]]  # each [3, H, W]


def encode_record(record: Record, processor, split_images: SplitImages | None = None) -> Encoded:
    """Tokenise one record through the processor and label its answer tokens. `split_images` is the base's
    `family.split_images` (default: LLaVA's one `[3, H, W]` per image)."""
    text, spans = answer_spans(processor, to_messages(record.turns))
    enc = processor(text=[text], images=[record.image], return_offsets_mapping=True, return_tensors="pt")
    ids = enc["input_ids"][0]  # [T]
    offsets = enc["offset_mapping"][0].tolist()  # T x (start, end) in the image-expanded text
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    image_pos = (ids == image_id).nonzero()
    if not len(image_pos):
        raise DataError(f"{record.source}: the processor produced no image tokens")
    # The processor expands the one image placeholder before every answer (into image tokens, and for some
    # families markers around them); shift answer spans by the expansion: the text after it is unchanged.
    plain = processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    delta = _last_end(offsets) - _last_end(plain)
    labels = torch.full_like(ids, IGNORE_INDEX)
    first_label_of_last = None
    for turn, (start, end) in enumerate(spans):
        inside = [i for i, (s, e) in enumerate(offsets) if e > s and s >= start + delta and e <= end + delta]
        if not inside:
            raise DataError(f"{record.source}: answer of turn {turn} produced no tokens")
        labels[inside] = ids[inside]
        first_label_of_last = inside[0]
    images = tuple((split_images or llava_split)(enc))
    return Encoded(ids, labels, images[0].pixel_values, int(first_label_of_last), record.source, images)


def encode_records(
    name: str, records: list[Record], bad: list[BadRecord], processor, split_images: SplitImages | None = None
) -> EncodedDataset:
    examples = [encode_record(r, processor, split_images) for r in records]
    eos = processor.tokenizer.eos_token_id
    if examples and eos is not None and int(examples[0].answer_ids[-1]) != eos:
        log.warning(
            "%s: the chat template does not end answers with EOS; greedy decoding stops at max tokens", name
        )
    return EncodedDataset(name, examples, bad)


def collate(examples: list[Encoded]) -> Batch:
    length = max(int(e.input_ids.shape[0]) for e in examples)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        labels[b, length - ex.labels.shape[0] :] = ex.labels
    images = [e.image_inputs() for e in examples]
    pixels = [ims[0].pixel_values for ims in images if len(ims) == 1]
    stackable = len(pixels) == len(examples) and all(
        p.ndim == 3 and p.shape == pixels[0].shape for p in pixels
    )
    return Batch([e.input_ids for e in examples], labels, torch.stack(pixels) if stackable else None, images)


def split_json(records: list[Record], eval_fraction: float) -> tuple[list[Record], list[Record]]:
    """Fixed split of a JSON file: a permutation seeded with JSON_SPLIT_SEED; the last part is held out."""
    if len(records) < 2 or eval_fraction <= 0:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(JSON_SPLIT_SEED)).tolist()
    n_eval = max(1, round(eval_fraction * len(records)))
    return [records[i] for i in order[:-n_eval]], [records[i] for i in order[-n_eval:]]


@dataclass
class DataOptions:
    """How to read `--data` / `--eval-data` (the CLI flags of the same names)."""

    data: str
    eval_data: str | None = None
    image_folder: str | None = None
    train_size: int | None = None  # cap (JSON, digits) or size (synthetic)
    eval_size: int | None = None
    eval_fraction: float = 0.1
    on_bad: OnBad = OnBad.FAIL
    seed: int = 0


def read_source(
    spec: str, opts: DataOptions, image_size: int, n: int | None, evaluation: bool
) -> tuple[list[Record], list[BadRecord]]:
    """Records of one dataset spec; `n` caps JSON/digits records and sets the size of a synthetic draw."""
    if is_builtin(spec):
        default = DEFAULT_SYNTHETIC_EVAL if evaluation else DEFAULT_SYNTHETIC_TRAIN
        size = n if n is not None else (default if spec.startswith("synthetic:") else 0)
        return builtin_records(spec, image_size, size, opts.seed, evaluation=evaluation), []
    if Path(spec).suffix.lower() != ".json":
        raise DataError(f"dataset {spec!r}: expected a LLaVA-format .json file or a built-in dataset")
    records, bad = read_llava_json(spec, opts.image_folder, opts.on_bad)
    return (records[:n] if n else records), bad


def load_data(
    opts: DataOptions, processor, image_size: int, split_images: SplitImages | None = None
) -> tuple[EncodedDataset, EncodedDataset]:
    """The encoded train and held-out eval sets for `opts` (see the module docstring for the splits).
    `split_images` is the base's `family.split_images` (default: LLaVA layout)."""
    own_split = opts.eval_data is None and not is_builtin(opts.data)
    train_records, bad = read_source(
        opts.data, opts, image_size, None if own_split else opts.train_size, False
    )
    eval_bad: list[BadRecord] = []
    if own_split:
        train_records, eval_records = split_json(train_records, opts.eval_fraction)
        train_records, eval_records = (
            train_records[: opts.train_size or None],
            eval_records[: opts.eval_size or None],
        )
    else:
        eval_records, eval_bad = read_source(
            opts.eval_data or opts.data, opts, image_size, opts.eval_size, True
        )
    if not train_records:
        raise DataError(f"{opts.data}: no training records")
    if not eval_records:
        log.warning("%s: no held-out records; periodic evaluation is disabled", opts.data)
    train = encode_records(opts.data, train_records, bad, processor, split_images)
    held_out = encode_records(
        opts.eval_data or f"{opts.data} (held out)", eval_records, eval_bad, processor, split_images
    )
    log.info(
        "data: %d train, %d eval examples (%d bad records skipped)",
        len(train),
        len(held_out),
        len(bad) + len(eval_bad),
    )
    return train, held_out


__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "BadRecord",
    "DataError",
    "DataOptions",
    "Encoded",
    "EncodedDataset",
    "OnBad",
    "collate",
    "encode_record",
    "load_data",
    "to_messages",
]
