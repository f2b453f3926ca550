"""`BundleStore`: a versioned filesystem store of validated bundles (`name@version`, a moving `latest`).

Contract:
- Versions are immutable. Auto versions are `v1, v2, ...` and never reused, even after a delete; explicit
  versions use the name charset and must be new (else `BundleConflictError`). `latest` is the most recently
  published version still present.
- Publishing validates the bundle (nothing is written for a bad one), stages it under `.tmp/` on the same
  filesystem with fsyncs, then, under the name's `flock`, allocates the version, renames the directory into
  place and atomically rewrites `<name>/index.json` (the commit point). Concurrent publishers (threads or
  processes) get distinct versions. A crash at any moment leaves the old or the new state; debris is swept
  when a store is opened while no publish or delete is in flight (see `prompts_store.store_index` for the
  layout and locks).
- Names and versions are validated before any path is built (`prompts_store.names`: a strict grammar that
  can never spell `index.json`, a temp or lock file, `.`/`..` or a case variant), so publishing can never
  replace the store's own files; symlinks in the store are refused.
- One unreadable name (a hand-edited index, bad permissions) never breaks the others: `list` skips it with a
  logged warning and reports it in `scan().broken`; resolving, loading and publishing other names work.
- Messages of the errors raised here name bundles (`name@version`), never a filesystem path (paths go to the
  log). A write that fails (disk full, quota, I/O error) raises `BundleStoreFullError` (507) or
  `BundleStoreError` and publishes nothing.
It does not cache loaded bundles or talk HTTP; the server does.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2pt.spec import ModelSpec
from prompts_store.atomic import TMP_MARK, fsync_dir, remove_tree, write_durable
from prompts_store.errors import (
    BundleConflictError,
    BundleError,
    BundleFileSetError,
    BundleHashError,
    BundleNotFoundError,
    BundleStoreError,
)
from prompts_store.format import TENSORS_FILE, encode_bundle, read_bundle_bytes, read_manifest
from prompts_store.limits import DEFAULT_LIMITS, BundleLimits
from prompts_store.manifest import MANIFEST_FILE, utc_now_iso
from prompts_store.names import is_valid, parse_ref, validate_name, validate_version
from prompts_store.store_index import (
    INDEX_FILE,
    LOCKS_DIR,
    STORE_LOCK,
    TMP_DIR,
    IndexEntry,
    NameIndex,
    flocked,
    read_index,
    try_flock_exclusive,
    write_index,
)
from prompts_store.store_safety import (
    ensure_reserve,
    without_paths,
    write_index_spending_reserve,
    writes_reported,
)
from prompts_store.validate import LoadedBundle, validate_bytes

log = logging.getLogger(__name__)
_AUTO_RE = re.compile(r"v([0-9]+)")


@dataclass(frozen=True)
class BundleRef:
    """One published version. `content_hash` identifies its content (caches key on it, never on the name)."""

    name: str
    version: str
    content_hash: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class BundleInfo:
    """A name in the store: its versions (oldest first) and the `latest` one."""

    name: str
    versions: list[str]
    latest: BundleRef


@dataclass(frozen=True)
class BrokenName:
    """A name whose index cannot be read: listed apart so that the other names keep working."""

    name: str
    error_type: str
    message: str


@dataclass(frozen=True)
class StoreListing:
    bundles: list[BundleInfo]
    broken: list[BrokenName]


@dataclass(frozen=True)
class VersionInfo:
    """What `inspect` shows about one version (all JSON-ready)."""

    name: str
    version: str
    latest: bool
    content_hash: str
    published_at: str
    created_at: str
    size_bytes: int
    base_model: dict[str, str]
    text_prompts: int
    visual_prompts: int
    has_projector: bool
    dtype: str
    shapes: dict[str, list[int]]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        metrics = self.provenance.get("metrics", {})
        return metrics if isinstance(metrics, dict) else {}

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["label"] = f"{self.name}@{self.version}"
        out["metrics"] = self.metrics
        return out


class BundleStore:
    """Filesystem store rooted at `root` (created if missing). Safe to share between threads and processes."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        try:
            for sub in (self.root, self.root / TMP_DIR, self.root / LOCKS_DIR):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BundleStoreError(
                f"cannot create bundle store at {self.root}: {exc}; choose a writable directory"
            ) from None
        self.sweep()
        ensure_reserve(self.root)

    # ---- paths and locks -----------------------------------------------------------------------------------
    def _name_dir(self, name: str) -> Path:
        path = self.root / validate_name(name)
        if path.is_symlink():
            log.warning("bundle store: %s is a symlink, refused", path)
            raise BundleStoreError(
                f"bundle {name!r} is a symlink in the store, and the store never follows links: "
                "remove it (the server log names the path)"
            )
        return path

    def _store_lock(self, shared: bool = True):
        return flocked(self.root / LOCKS_DIR / STORE_LOCK, shared=shared)

    def _name_lock(self, name: str):
        return flocked(self.root / LOCKS_DIR / f"{validate_name(name)}.lock")

    def _ref(self, name: str, entry: IndexEntry) -> BundleRef:
        return BundleRef(name, entry.version, entry.content_hash, self._name_dir(name) / entry.version)

    # ---- crash recovery ------------------------------------------------------------------------------------
    def sweep(self) -> bool:
        """Remove debris of crashed publishes/deletes. Runs only when nothing is in flight; returns whether
        it ran."""
        with try_flock_exclusive(self.root / LOCKS_DIR / STORE_LOCK) as exclusive:
            if not exclusive:
                log.info("bundle store %s busy; sweep skipped", self.root)
                return False
            for entry in (self.root / TMP_DIR).iterdir():
                remove_tree(entry)
            for name_dir in self._name_dirs():
                try:
                    self._sweep_name(name_dir)
                except BundleStoreError as exc:  # an unreadable index: leave that name alone
                    log.warning("bundle store: not sweeping %s: %s", name_dir.name, exc)
        return True

    def _name_dirs(self) -> list[Path]:
        return sorted(
            p for p in self.root.iterdir() if is_valid(p.name) and p.is_dir() and not p.is_symlink()
        )

    def _sweep_name(self, name_dir: Path) -> None:
        listed = {e.version for e in read_index(name_dir, name_dir.name).versions}
        for entry in name_dir.iterdir():
            stale_tmp = entry.name.startswith(".") and TMP_MARK in entry.name
            orphan = entry.name != INDEX_FILE and not entry.name.startswith(".") and entry.name not in listed
            if stale_tmp or orphan:
                log.warning("bundle store: removing debris %s", entry)
                remove_tree(entry)

    # ---- publish -------------------------------------------------------------------------------------------
    def publish(
        self,
        src: str | os.PathLike[str] | LoadedBundle,
        name: str | None = None,
        version: str | None = None,
        spec: ModelSpec | None = None,
        limits: BundleLimits = DEFAULT_LIMITS,
    ) -> BundleRef:
        """Publish a bundle directory (or an already loaded bundle, re-encoded as float32) as `name@version`.

        `name` defaults to the manifest's name, `version` to the next auto version.
        """
        if isinstance(src, LoadedBundle):
            m = src.manifest
            manifest_bytes, tensor_bytes = encode_bundle(
                src.prompts, m.model_spec(), m.name, None, m.provenance
            )
        else:
            manifest_bytes, tensor_bytes = read_bundle_bytes(src, limits)
        return self.publish_files(manifest_bytes, tensor_bytes, spec, limits, name=name, version=version)

    def publish_files(
        self,
        manifest_bytes: bytes,
        tensor_bytes: bytes,
        spec: ModelSpec | None,
        limits: BundleLimits = DEFAULT_LIMITS,
        name: str | None = None,
        version: str | None = None,
    ) -> BundleRef:
        """Validate an uploaded bundle in memory, then publish it. Nothing is visible or left behind on
        failure."""
        if name is not None:
            validate_name(name)
        if version is not None:
            validate_version(version)
        loaded = validate_bytes(manifest_bytes, tensor_bytes, spec, limits)
        name = name or loaded.manifest.name
        with writes_reported(self.root, "publish", f"{name}@{version}" if version else name):
            with self._store_lock(shared=True):
                staging = self.root / TMP_DIR / uuid.uuid4().hex
                try:
                    os.mkdir(staging)
                    write_durable(staging / TENSORS_FILE, tensor_bytes)
                    with self._name_lock(name):
                        ref = self._commit(staging, loaded, name, version)
                finally:
                    remove_tree(staging)
        log.info("published bundle %s (%s)", ref.label, ref.content_hash)
        return ref

    def _commit(self, staging: Path, loaded: LoadedBundle, name: str, version: str | None) -> BundleRef:
        """Under the name lock: allocate the version, finish the staged dir, rename it into place, rewrite
        the index."""
        name_dir = self._name_dir(name)
        if not name_dir.is_dir():
            name_dir.mkdir()
            fsync_dir(self.root)  # the new name's directory entry survives a power cut too
        index = read_index(name_dir, name)
        if version is None:
            version = f"v{index.next_auto}"
        elif index.find(version) is not None:
            raise BundleConflictError(
                f"{name}@{version} already exists and versions are immutable; publish under a new version "
                "(or omit the version to get the next v<N>)"
            )
        manifest = loaded.manifest.model_copy(update={"name": name, "version": version})
        write_durable(staging / MANIFEST_FILE, manifest.to_bytes())
        fsync_dir(staging)
        target = name_dir / version
        remove_tree(target)  # not in the index, so debris of a crashed publish (we hold the name lock)
        os.rename(staging, target)
        fsync_dir(name_dir)
        entry = IndexEntry(version=version, content_hash=loaded.content_hash, published_at=utc_now_iso())
        auto = _AUTO_RE.fullmatch(version)
        next_auto = max(index.next_auto, int(auto.group(1)) + 1) if auto else index.next_auto
        write_index(name_dir, NameIndex(name, next_auto, (*index.versions, entry)))
        return self._ref(name, entry)

    # ---- read ----------------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> BundleRef:
        """`"name"` (latest) or `"name@version"` -> `BundleRef`; raises `BundleNotFoundError` /
        `BundleNameError`."""
        name, version = parse_ref(ref)
        index = read_index(self._name_dir(name), name)
        if index.latest is None:
            raise BundleNotFoundError(
                f"no bundle named {name!r}; `m2pt bundle list` (or GET /v1/bundles) shows them"
            )
        entry = index.latest if version is None else index.find(version)
        if entry is None:
            have = ", ".join(e.version for e in index.versions)
            raise BundleNotFoundError(
                f"bundle {name!r} has no version {version!r}; published versions: {have}"
            )
        return self._ref(name, entry)

    def list(self) -> list[BundleInfo]:
        """Every readable name with at least one version, sorted by name (unreadable ones are skipped with a
        logged warning; `scan` reports them)."""
        return self.scan().bundles

    def scan(self) -> StoreListing:
        """`list`, plus the names whose index cannot be read (each with its error)."""
        out, broken = [], []
        for name_dir in self._name_dirs():
            try:
                index = read_index(name_dir, name_dir.name)
            except BundleStoreError as exc:
                log.warning("bundle store: skipping unreadable bundle %s: %s", name_dir.name, exc)
                broken.append(BrokenName(name_dir.name, exc.error_type, str(exc)))
                continue
            if index.latest is not None:
                versions = [e.version for e in index.versions]
                out.append(BundleInfo(name_dir.name, versions, self._ref(name_dir.name, index.latest)))
        return StoreListing(out, broken)

    def inspect(self, ref: str) -> builtins.list[VersionInfo]:  # (`list` here is the method above)
        """Details of every version of `name` (oldest first), or of the one version `name@version` names."""
        name, version = parse_ref(ref)
        index = read_index(self._name_dir(name), name)
        entries = list(index.versions) if version is None else [self.resolve(ref)]
        if not entries:
            raise BundleNotFoundError(
                f"no bundle named {name!r}; `m2pt bundle list` (or GET /v1/bundles) shows them"
            )
        latest = index.latest.version if index.latest else None
        return [self._version_info(name, e.version, latest) for e in entries]

    def _version_info(self, name: str, version: str, latest: str | None) -> VersionInfo:
        path = self._name_dir(name) / version
        try:
            m = read_manifest(path)
            size = sum((path / f).stat().st_size for f in (MANIFEST_FILE, TENSORS_FILE))
        except (FileNotFoundError, BundleFileSetError) as exc:
            if path.exists() and isinstance(exc, BundleFileSetError):
                raise without_paths(exc, self.root, path, f"{name}@{version}") from None
            raise BundleNotFoundError(f"{name}@{version} was deleted meanwhile") from None
        except BundleError as exc:
            raise without_paths(exc, self.root, path, f"{name}@{version}") from None
        entry = read_index(self._name_dir(name), name).find(version)
        return VersionInfo(
            name=name,
            version=version,
            latest=version == latest,
            content_hash=m.content_hash,
            published_at=entry.published_at if entry else "",
            created_at=m.created_at,
            size_bytes=size,
            base_model={"model_id": m.base_model.model_id, "fingerprint": m.base_model.fingerprint},
            text_prompts=m.text_prompts,
            visual_prompts=m.visual_prompts,
            has_projector=m.has_projector,
            dtype=m.dtype,
            shapes={k: list(v.shape) for k, v in sorted(m.tensors.items())},
            provenance=m.provenance,
        )

    def load(
        self, ref: str | BundleRef, spec: ModelSpec | None = None, limits: BundleLimits = DEFAULT_LIMITS
    ) -> LoadedBundle:
        """Resolve (if given a string), then fully validate and load. Its content hash must match the
        index."""
        from prompts_store.format import load_bundle

        if isinstance(ref, str):
            ref = self.resolve(ref)
        try:
            loaded = load_bundle(ref.path, spec, limits)
        except BundleFileSetError as exc:
            if not ref.path.exists():
                raise BundleNotFoundError(f"{ref.label} was deleted; resolve the name again") from None
            raise without_paths(exc, self.root, ref.path, ref.label) from None
        except BundleError as exc:
            raise without_paths(exc, self.root, ref.path, ref.label) from None
        except OSError as exc:
            log.error("bundle store: reading %s (%s) failed: %s", ref.label, ref.path, exc)
            raise BundleStoreError(
                f"{ref.label} could not be read from the store ({type(exc).__name__}); the server log has "
                "the details"
            ) from None
        if loaded.content_hash != ref.content_hash:
            raise BundleHashError(
                f"{ref.label} on disk has content hash {loaded.content_hash}, the store index says "
                f"{ref.content_hash}; the store was modified outside m2pt: delete and re-publish this version"
            )
        return loaded

    # ---- delete --------------------------------------------------------------------------------------------
    def delete(self, name: str, version: str | None = None) -> builtins.list[BundleRef]:
        """Delete one version, or every version of `name`. Returns what was deleted; unknown ->
        `BundleNotFoundError`.

        Version numbers are not reused afterwards. Processes that already loaded the bundle keep their copy.
        """
        if version is not None:
            validate_version(version)
        with writes_reported(self.root, "delete", f"{name}@{version}" if version else name):
            refs = self._delete_locked(name, version)
        ensure_reserve(self.root)
        log.info("deleted bundle(s) %s", ", ".join(r.label for r in refs))
        return refs

    def _delete_locked(self, name: str, version: str | None) -> builtins.list[BundleRef]:
        with self._store_lock(shared=True), self._name_lock(name):
            name_dir = self._name_dir(name)
            try:
                index = read_index(name_dir, name)
            except BundleStoreError:
                if version is not None:
                    raise
                return self._delete_broken(name, name_dir)
            gone = [e for e in index.versions if version is None or e.version == version]
            if not gone:
                what = f"{name}@{version}" if version else name
                raise BundleNotFoundError(
                    f"no bundle {what} to delete; `m2pt bundle list` shows what is published"
                )
            keep = tuple(e for e in index.versions if e not in gone)
            # the commit point
            write_index_spending_reserve(self.root, name_dir, NameIndex(name, index.next_auto, keep))
            refs = [self._ref(name, e) for e in gone]
            for ref in refs:
                if ref.path.exists():
                    trash = self.root / TMP_DIR / uuid.uuid4().hex
                    os.rename(ref.path, trash)
                    remove_tree(trash)
            fsync_dir(name_dir)
        return refs

    def _delete_broken(self, name: str, name_dir: Path) -> builtins.list[BundleRef]:
        """Delete a whole name whose index is unreadable (the way out of a hand-edited store). Under the name
        lock; the rename out of the root is the commit point."""
        trash = self.root / TMP_DIR / uuid.uuid4().hex
        os.rename(name_dir, trash)
        fsync_dir(self.root)
        remove_tree(trash)
        log.warning("deleted unreadable bundle %s", name)
        return [BundleRef(name, "*", "", name_dir)]
