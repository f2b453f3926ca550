"""What keeps the store's failures clean: write errors turned into store errors that name the bundle, errors
of lower layers stripped of filesystem paths, and the space reserve that lets a delete commit on a full disk.

Contract:
- `writes_reported(root, verb, what)`: an `OSError` inside becomes `BundleStoreFullError` (507; ENOSPC,
  EDQUOT, EFBIG) or `BundleStoreError` (500), whose message names `what` (a bundle) and never a path; the path
  and the original error go to the log.
- `without_paths(exc, root, path, label)`: the same error type, `path` replaced by `label` and `root` by "the
  bundle store", the label in front when the message does not name it yet.
- `ensure_reserve(root)`: best effort, keeps `RESERVE_BYTES` of ballast at `<root>/.locks/space.reserve`;
  `write_index_spending_reserve` spends it when an index rewrite hits a full disk and retries once.
No bundle semantics and no locking here; `prompts_store.store` holds the locks.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prompts_store.atomic import TMP_MARK, write_durable
from prompts_store.errors import BundleError, BundleStoreError, BundleStoreFullError
from prompts_store.store_index import LOCKS_DIR, NameIndex, write_index

log = logging.getLogger(__name__)

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
RESERVE_FILE = "space.reserve"  # under .locks/ (never a bundle name): ballast a delete on a full disk spends
RESERVE_BYTES = 64 * 1024


@contextmanager
def writes_reported(root: Path, verb: str, what: str) -> Iterator[None]:
    """Turn an `OSError` of a store write into a `BundleStoreError` that names the bundle, not a path."""
    try:
        yield
    except OSError as exc:
        log.error("bundle store %s: %s of %s failed: %s", root, verb, what, exc)
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        done = "nothing was published" if verb == "publish" else "nothing was deleted"
        if exc.errno in FULL_ERRNOS:
            raise BundleStoreFullError(
                f"could not {verb} {what}: the bundle store's disk is full ({reason}); {done}: free "
                "space on the store's disk (deleting old versions frees it too) and try again"
            ) from None
        raise BundleStoreError(
            f"could not {verb} {what}: the bundle store could not be written ({reason}); {done} (the "
            "server log has the details)"
        ) from None


def without_paths(exc: BundleError, root: Path, path: Path, label: str) -> BundleError:
    """The same error with every mention of `path` (or the store root) replaced by the bundle's label, and
    the label in front when the message does not name it yet."""
    message = str(exc)
    for where, what in ((str(path), label), (str(root), "the bundle store")):
        message = message.replace(where, what)
    if message != str(exc):
        log.warning("bundle store: %s: %s", label, exc)
    if label not in message:
        message = f"{label}: {message}"
    return type(exc)(message)


def ensure_reserve(root: Path) -> None:
    """Best effort: keep `RESERVE_BYTES` of ballast, so that a delete can still commit on a full disk."""
    path = root / LOCKS_DIR / RESERVE_FILE
    if path.exists():
        return
    tmp = path.with_name(f".{RESERVE_FILE}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        write_durable(tmp, bytes(RESERVE_BYTES))
        os.rename(tmp, path)
    except OSError as exc:  # a full or read-only store works without it
        log.debug("bundle store: no space reserve (%s)", exc)
        tmp.unlink(missing_ok=True)


def write_index_spending_reserve(root: Path, name_dir: Path, index: NameIndex) -> None:
    """`write_index`; on a full disk, spend the ballast file and try once more (deleting frees space, but
    its commit point needs a few KiB first)."""
    try:
        write_index(name_dir, index)
    except OSError as exc:
        reserve = root / LOCKS_DIR / RESERVE_FILE
        if exc.errno not in FULL_ERRNOS or not reserve.exists():
            raise
        log.warning("bundle store %s: disk full; spending the space reserve to commit a delete", root)
        reserve.unlink()
        write_index(name_dir, index)
