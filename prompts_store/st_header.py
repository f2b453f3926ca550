"""Strict parser of the safetensors container, run on raw bytes BEFORE the `safetensors` library sees them.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON `{name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}`, then the data buffer. We refuse (with `BundleNotSafetensorsError`) anything that
is not exactly that: a pickle or zip renamed to `.safetensors`, truncated bytes, a header longer than the cap,
non-UTF-8 / non-JSON headers, unknown dtypes, offsets out of range, overlapping or leaving gaps, shape
products that disagree with the byte counts, and trailing bytes. Nothing is unpickled or executed, and no
tensor is materialised here.

`tensor_sha256` hashes each tensor's raw little-endian bytes straight from the buffer (what the manifest
records). This module does not check names or shapes against a model; `prompts_store.validate` does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prompts_store.errors import BundleNotSafetensorsError

# safetensors dtype code -> bytes per element
ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
MAX_TENSORS = 4096  # a bundle holds a handful (prompts + projector); bounds the work of one header check
MAX_DIMS = 8  # dimensions per shape
_QUOTE_CHARS = 100  # how much of a client-chosen tensor name an error message quotes
_FIX = "re-export the bundle with `prompts_store.save_bundle` (or `m2pt train`): it writes real safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: dtype code (e.g. "F32"), shape and byte range inside the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _q(name: str) -> str:
    """A tensor name as error messages quote it: repr, cut to `_QUOTE_CHARS`."""
    text = repr(name)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _bad(why: str) -> BundleNotSafetensorsError:
    return BundleNotSafetensorsError(f"tensors file is not a valid safetensors file: {why}; {_FIX}")


def _read_json_header(data: bytes, max_header_bytes: int) -> tuple[int, object]:
    if len(data) < 8:
        raise _bad(f"only {len(data)} bytes, too short for the 8-byte header length (truncated?)")
    n = int.from_bytes(data[:8], "little")
    if n > max_header_bytes:
        raise _bad(
            f"header length field says {n} bytes, over the {max_header_bytes}-byte cap "
            "(a pickle, zip or other file renamed to .safetensors looks like this)"
        )
    if n < 2 or 8 + n > len(data):
        raise _bad(
            f"header length field says {n} bytes but the file holds {len(data) - 8} after it (truncated?)"
        )
    try:
        text = data[8 : 8 + n].decode("utf-8")
        return n, json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as exc:
        raise _bad(
            f"header names {_q(exc.key)} twice (a duplicate tensor or field name; readers would silently "
            "keep only one)"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"header is not UTF-8 JSON ({type(exc).__name__})") from None


def _parse_entry(name: str, raw: object) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _bad(f"entry {_q(name)} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in ITEM_SIZES:
        raise _bad(f"entry {_q(name)} has unknown dtype {_q(str(dtype))}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise _bad(f"entry {_q(name)} has a shape that is not a list of at most {MAX_DIMS} dimensions")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(f"entry {_q(name)} has a shape that is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(f"entry {_q(name)} has data_offsets that are not [begin, end] with 0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d  # Python ints: no overflow
    if numel * ITEM_SIZES[dtype] != offsets[1] - offsets[0]:
        raise _bad(
            f"entry {_q(name)}: shape {shape} x {dtype} does not match its "
            f"{offsets[1] - offsets[0]} data bytes"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def parse_header(data: bytes, max_header_bytes: int) -> SafetensorsHeader:
    """Validate the container structure of `data` (a whole safetensors file) and return its header."""
    n, header = _read_json_header(data, max_header_bytes)
    if not isinstance(header, dict):
        raise _bad("header JSON is not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _bad(f"header lists {len(header)} tensors, over the cap of {MAX_TENSORS}")
    tensors = {name: _parse_entry(name, raw) for name, raw in header.items()}
    cursor = 0
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != cursor:
            raise _bad(f"entry {_q(name)} starts at byte {entry.begin}, expected {cursor} (overlap or gap)")
        cursor = entry.end
    buffer_len = len(data) - 8 - n
    if cursor != buffer_len:
        what = "truncated data" if cursor > buffer_len else "trailing bytes after the last tensor"
        raise _bad(f"{what}: tensors cover {cursor} bytes, the data buffer holds {buffer_len}")
    return SafetensorsHeader(header_len=n, tensors=tensors, metadata=metadata)


def tensor_sha256(data: bytes, header: SafetensorsHeader) -> dict[str, str]:
    """Hex sha256 of each tensor's raw (little-endian) bytes, read straight from the file buffer."""
    view = memoryview(data)
    start = header.data_start
    return {
        name: hashlib.sha256(view[start + e.begin : start + e.end]).hexdigest()
        for name, e in header.tensors.items()
    }
