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
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prompts_store.atomic import read_capped, write_atomic
from prompts_store.errors import BundleStoreError

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
    """The index of `name` (an empty one when the name was never published)."""
    path = name_dir / INDEX_FILE
    try:
        data = read_capped(path, _MAX_INDEX_BYTES)
    except FileNotFoundError:
        return NameIndex(name=name)
    except OSError as exc:
        raise BundleStoreError(
            f"cannot read {path} ({exc}); check the store directory's permissions"
        ) from None
    try:
        raw = json.loads(data or b"")
        entries = tuple(IndexEntry(**e) for e in raw["versions"])
        return NameIndex(name=name, next_auto=int(raw["next_auto"]), versions=entries)
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleStoreError(
            f"{path} is unreadable ({type(exc).__name__}); it is only written atomically, so the store "
            "directory was edited by hand: restore it from backup or delete the name's directory"
        ) from None


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
