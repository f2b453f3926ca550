"""Durable, atomic file operations (POSIX): write + fsync, tmp + rename, directory fsync, bounded reads.

Contract: after `write_atomic(path, data)` returns, `path` holds `data` and survives a power cut; before,
`path` holds its old content (or does not exist). A crash leaves at most a hidden `.<name>.tmp-*` file next to
it, which the store sweeps. Reads refuse symlinks and files larger than the caller's cap. No bundle semantics
here.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` (must not exist), write all of `data`, fsync. The directory entry is NOT fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_sibling(path: Path) -> Path:
    """A hidden, unique temp name next to `path` (same directory, so same filesystem)."""
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (tmp + fsync + rename + fsync of the directory)."""
    tmp = tmp_sibling(path)
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_capped(path: Path, cap: int) -> bytes | None:
    """The bytes of regular file `path` (symlinks refused with OSError), or None when it is larger than
    `cap`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        if st.st_size > cap:
            return None
        data = f.read(st.st_size + 1)  # +1: notice a file that grew since fstat
    return None if len(data) > cap else data


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree if present (no error when already gone)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
