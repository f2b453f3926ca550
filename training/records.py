"""Raw training records: one image plus a conversation, read from LLaVA-format JSON, and how bad records are
reported.

LLaVA format: `[{"image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}]`. Turns alternate human/gpt starting with human; the `<image>` token
appears exactly once, in a human turn. Image paths are relative to an image folder and must stay inside it (no
absolute paths, no `..`, no symlink that leads out): the JSON may come from a client.

Every problem is a `BadRecord(index, reason)`; `OnBad.SKIP` logs and drops it, `OnBad.FAIL` raises `DataError`
naming the record. This module reads files and decodes images; it does not tokenise (see `training.data`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before decoding


class DataError(ValueError):
    """The training data cannot be used as given; the message names the file/record and how to fix it."""


class OnBad(StrEnum):
    SKIP = "skip"
    FAIL = "fail"


@dataclass(frozen=True)
class BadRecord:
    index: int
    reason: str

    def __str__(self) -> str:
        return f"record {self.index}: {self.reason}"


@dataclass
class Record:
    """One conversation: `turns` = [(human text, answer), ...]; one human text holds the image token."""

    image: Image.Image  # RGB
    turns: list[tuple[str, str]]
    source: str  # where it came from, for messages ("data.json[12]", "digits[3]")


class BadRecordError(Exception):
    """Internal: raised while parsing one record; turned into a `BadRecord`."""


def check_turns(turns: list[tuple[str, str]]) -> None:
    """Raise `BadRecordError` unless there is exactly one image token and every answer is non-empty."""
    if not turns:
        raise BadRecordError("no conversation turns")
    count = sum(human.count(IMAGE_TOKEN) for human, _ in turns)
    if count == 0:
        raise BadRecordError(
            f"no {IMAGE_TOKEN} token in any human turn (put '{IMAGE_TOKEN}\\n' before the question)"
        )
    if count > 1:
        raise BadRecordError(f"{count} {IMAGE_TOKEN} tokens; exactly one image per record is supported")
    if any(IMAGE_TOKEN in answer for _, answer in turns):
        raise BadRecordError(f"{IMAGE_TOKEN} token inside an answer")
    for turn, (_, answer) in enumerate(turns):
        if not answer.strip():
            raise BadRecordError(f"empty answer in turn {turn}")


def parse_conversations(raw: Any) -> list[tuple[str, str]]:
    """`[{"from": "human", "value"}, {"from": "gpt", "value"}, ...]` -> [(human, gpt), ...]."""
    if not isinstance(raw, list) or not raw:
        raise BadRecordError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    if len(raw) % 2:
        raise BadRecordError(f"{len(raw)} turns; expected human/gpt pairs (an even number)")
    turns = []
    for i in range(0, len(raw), 2):
        human, gpt = raw[i], raw[i + 1]
        for j, (turn, want) in enumerate(((human, "human"), (gpt, "gpt"))):
            if (
                not isinstance(turn, dict)
                or turn.get("from") != want
                or not isinstance(turn.get("value"), str)
            ):
                raise BadRecordError(f"turn {i + j} must be {{'from': '{want}', 'value': <string>}}")
        turns.append((human["value"], gpt["value"]))
    check_turns(turns)
    return turns


def resolve_image_path(folder: Path, name: Any) -> Path:
    """`folder / name`, refusing anything that is not a plain relative path staying inside `folder`."""
    if not isinstance(name, str) or not name.strip():
        raise BadRecordError("missing 'image' (a path relative to the image folder)")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or "\x00" in name:
        raise BadRecordError(f"image path {name!r} must be relative to the image folder, without '..'")
    root = folder.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise BadRecordError(f"image path {name!r} leads outside the image folder")
    if not path.is_file():
        raise BadRecordError(f"image {name!r} not found in {folder}")
    return path


def open_image(path: Path) -> Image.Image:
    """Decode an image fully as RGB, or raise `BadRecordError` saying why it cannot be read."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise BadRecordError(
                    f"image {path.name!r} is {img.width}x{img.height}, above {MAX_IMAGE_PIXELS} pixels"
                )
            return img.convert("RGB")
    except BadRecordError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRecordError(f"image {path.name!r} is unreadable ({type(exc).__name__}: {exc})") from exc


def parse_record(index: int, raw: Any, folder: Path, source: str) -> Record:
    if not isinstance(raw, dict):
        raise BadRecordError("not a JSON object")
    turns = parse_conversations(raw.get("conversations"))
    image = open_image(resolve_image_path(folder, raw.get("image")))
    return Record(image=image, turns=turns, source=f"{source}[{index}]")


def handle_bad(bad: list[BadRecord], total: int, on_bad: OnBad, source: str) -> None:
    """Log every bad record; raise `DataError` when failing on bad records or when nothing usable is left."""
    for item in bad:
        log.warning("%s: %s", source, item)
    if bad and on_bad is OnBad.FAIL:
        shown = "; ".join(str(b) for b in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{source}: {len(bad)} bad record(s): {shown}. Fix them or pass --on-bad-record skip")
    if total and len(bad) == total:
        raise DataError(f"{source}: all {total} records are bad (first: {bad[0]})")
    if bad:
        log.warning("%s: skipped %d of %d records", source, len(bad), total)


def read_llava_json(
    path: str | Path, image_folder: str | Path | None = None, on_bad: OnBad = OnBad.FAIL
) -> tuple[list[Record], list[BadRecord]]:
    """Parse a LLaVA-format JSON file; images resolve under `image_folder` (default: the JSON's folder)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found (set --image-folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, list):
        raise DataError(f"{path} must hold a JSON list of records, got {type(raw).__name__}")
    records, bad = [], []
    for index, item in enumerate(raw):
        try:
            records.append(parse_record(index, item, folder, path.name))
        except BadRecordError as exc:
            bad.append(BadRecord(index, str(exc)))
    if not raw:
        raise DataError(f"{path} holds no records")
    handle_bad(bad, len(raw), on_bad, path.name)
    return records, bad
