"""The store's on-disk bookkeeping: the per-name `index.json` (the single source of truth for what is
published) and the `flock` locks that make publishing and deleting safe across threads and processes.

Layout under the store root::

    .locks/store.lock    shared by every publish/delete in flight; exclusive (non-blocking) by the sweep
    .locks/<name>.lock   exclusive around a name's commit (allocate version, rename, rewrite index)
    .tmp/<uuid>/         staging directories (same filesystem as the bundles, so rename is atomic)
    <name>/index.json    {"format": 1, "name", "next_auto",
                          "versions": [{"version", "content_hash", "published_at"}]}
    <name>/<version>/    manifest.json + tensors.safetensors

A version is visible exactly when `index.json` lists it; `index.json` is only ever replaced atomically, so
readers need no lock. A version directory that the index does not list is debris from a crash and is removed
by the sweep. The last entry of `versions` is `latest`. This module does no bundle validation.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prompts_store.atomic import read_capped, write_atomic
from prompts_store.errors import BundleStoreError
from prompts_store.names import is_valid

log = logging.getLogger(__name__)
INDEX_FILE = "index.json"
LOCKS_DIR = ".locks"
TMP_DIR = ".tmp"
STORE_LOCK = "store.lock"
_MAX_INDEX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class IndexEntry:
    version: str
    content_hash: str
    published_at: str


@dataclass(frozen=True)
class NameIndex:
    """Published versions of one name, oldest first; `next_auto` is the number of the next auto version
    `v<N>`."""

    name: str
    next_auto: int = 1
    versions: tuple[IndexEntry, ...] = field(default_factory=tuple)

    def find(self, version: str) -> IndexEntry | None:
        return next((e for e in self.versions if e.version == version), None)

    @property
    def latest(self) -> IndexEntry | None:
        return self.versions[-1] if self.versions else None

    def to_bytes(self) -> bytes:
        data = {
            "format": 1,
            "name": self.name,
            "next_auto": self.next_auto,
            "versions": [e.__dict__ for e in self.versions],
        }
        return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def read_index(name_dir: Path, name: str) -> NameIndex:
    """The index of `name` (an empty one when the name was never published).

    Raises `BundleStoreError` naming the bundle (the path goes to the log only) when the index cannot be read
    or does not hold a well-formed list of valid versions."""
    path = name_dir / INDEX_FILE
    try:
        data = read_capped(path, _MAX_INDEX_BYTES)
    except FileNotFoundError:
        return NameIndex(name=name)
    except OSError as exc:
        log.warning("bundle store: cannot read %s: %s", path, exc)
        raise BundleStoreError(
            f"the index of bundle {name!r} cannot be read ({type(exc).__name__}); check the store "
            "directory's permissions (the server log names the file)"
        ) from None
    try:
        return _parse_index(data, name)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("bundle store: %s is unreadable (%s: %s)", path, type(exc).__name__, exc)
        raise BundleStoreError(
            f"the index of bundle {name!r} is unreadable ({type(exc).__name__}); it is only written "
            "atomically, so the store was edited by hand: restore it from backup, or delete the bundle "
            "(the server log names the file)"
        ) from None


def _parse_index(data: bytes | None, name: str) -> NameIndex:
    raw = json.loads(data or b"")
    entries = tuple(IndexEntry(**e) for e in raw["versions"])
    next_auto = raw["next_auto"]
    if type(next_auto) is not int or next_auto < 1:
        raise ValueError("next_auto is not a positive integer")
    for e in entries:
        if not is_valid(e.version) or not all(isinstance(v, str) for v in (e.content_hash, e.published_at)):
            raise ValueError("an entry has an invalid version or a non-string field")
    if len({e.version for e in entries}) != len(entries):
        raise ValueError("a version is listed twice")
    return NameIndex(name=name, next_auto=next_auto, versions=entries)


def write_index(name_dir: Path, index: NameIndex) -> None:
    """Atomically replace the index (the commit point of publish and delete)."""
    write_atomic(name_dir / INDEX_FILE, index.to_bytes())


@contextmanager
def flocked(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold a blocking `flock` on `path` (created if needed). Each call opens its own descriptor, so the
    lock also excludes other threads of this process; the kernel drops it when the process dies (SIGKILL
    included)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def try_flock_exclusive(path: Path) -> Iterator[bool]:
    """Yield True holding an exclusive lock on `path`, or False (immediately) when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)
