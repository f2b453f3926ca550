"""Where bundles live by default, and a layered store: a writable user store first, read-only stores behind.

Locations (no work at import time; read when called):
- `user_store_dir()`: where what users train, publish, push or upload goes: `$M2PT_STORE` if set, else
  `$M2PT_HOME/bundles`, with `$M2PT_HOME` defaulting to `~/.local/share/m2pt`. Outside the repository, so
  training or uploading never edits tracked files.
- `DEMO_STORE_DIR`: the shipped demo bundles (`<repo>/demo/bundles`), served read-only beside the user store.

`ReadOnlyBundleStore(root)`: a `BundleStore` that never writes: opening it creates nothing and sweeps nothing
(the directory must exist), `publish*` and `delete` raise `BundleReadOnlyError` (HTTP 403).

`LayeredBundleStore(writable, read_only)`: the union of its layers by name, with the `BundleStore` read and
write interface the server, the CLI and training use:
- a name's versions are those of every layer; `name` (latest) is the writable layer's latest when it holds any
  version of the name, else the first read-only layer's; `name@version` is found in whichever layer holds it;
- publishing goes to the writable layer only, and auto versions continue after the read-only layers'
  (training `digits` over the demo's `digits@v1` makes `digits@v2`, never a second `digits@v1`); an explicit
  version that any layer holds is a `BundleConflictError`;
- deleting removes versions from the writable layer only (and the `<name>@<version>.curves.png` training wrote
  beside them); asking to delete a version that only a read-only layer holds raises `BundleReadOnlyError`.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from m2pt.spec import ModelSpec
from prompts_store.errors import BundleConflictError, BundleError, BundleNotFoundError, BundleStoreError
from prompts_store.format import read_bundle_bytes
from prompts_store.limits import DEFAULT_LIMITS, BundleLimits
from prompts_store.names import parse_ref
from prompts_store.store import BrokenName, BundleInfo, BundleRef, BundleStore, StoreListing, VersionInfo
from prompts_store.store_index import read_index
from prompts_store.validate import LoadedBundle

log = logging.getLogger(__name__)

DEMO_STORE_DIR = Path(__file__).resolve().parents[1] / "demo" / "bundles"
HOME_ENV, STORE_ENV = "M2PT_HOME", "M2PT_STORE"
CURVES_SUFFIX = ".curves.png"
_AUTO = re.compile(r"v([0-9]+)")
_PUBLISH_RETRIES = 32


class BundleReadOnlyError(BundleError):
    """A write (publish, delete) aimed at a read-only store, such as the shipped demo bundles."""

    status = 403
    error_type = "bundle_read_only"


def m2pt_home() -> Path:
    """`$M2PT_HOME`, else `~/.local/share/m2pt`."""
    return Path(os.environ.get(HOME_ENV) or "~/.local/share/m2pt").expanduser()


def user_store_dir() -> Path:
    """The writable store users' bundles go to: `$M2PT_STORE`, else `$M2PT_HOME/bundles`."""
    explicit = os.environ.get(STORE_ENV)
    return Path(explicit).expanduser() if explicit else m2pt_home() / "bundles"


def same_dir(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


class ReadOnlyBundleStore(BundleStore):
    """A store that is only read (see the module contract). `root` must be an existing directory."""

    def __init__(self, root: str | os.PathLike[str]):  # deliberately no super().__init__: it would write
        self.root = Path(root)
        if not self.root.is_dir():
            raise BundleStoreError(f"read-only bundle store {self.root} is not a directory")

    def sweep(self) -> bool:
        return False

    def publish_files(self, *args: object, **kwargs: object) -> BundleRef:
        raise BundleReadOnlyError("this bundle store is read-only; publish to the writable (user) store")

    def delete(self, name: str, version: str | None = None) -> list[BundleRef]:
        what = f"{name}@{version}" if version else name
        raise BundleReadOnlyError(
            f"{what} is a shipped bundle in a read-only store and cannot be deleted; only bundles you "
            "published or uploaded can be"
        )


def _versions(store: BundleStore, name: str) -> list[str]:
    return [e.version for e in read_index(store._name_dir(name), name).versions]


class LayeredBundleStore:
    """A writable `BundleStore` first, then read-only ones (see the module contract). Thread and process safe
    as its layers are."""

    def __init__(self, writable: BundleStore, read_only: list[ReadOnlyBundleStore] | None = None):
        self.writable = writable
        self.read_only = list(read_only or [])
        self.root = writable.root

    @property
    def layers(self) -> list[BundleStore]:
        return [self.writable, *self.read_only]

    def layer_of(self, ref: BundleRef) -> BundleStore:
        """The layer `ref` lives in."""
        for layer in self.layers:
            if ref.path.parent.parent.resolve() == layer.root.resolve():
                return layer
        raise BundleNotFoundError(f"{ref.label} is in none of this server's stores")

    def is_read_only(self, ref: BundleRef) -> bool:
        return self.layer_of(ref) is not self.writable

    # ---- read ----------------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> BundleRef:
        """Latest of the first layer holding the name, or the layer holding `name@version`."""
        name, _ = parse_ref(ref)
        errors: list[BundleNotFoundError] = []
        for layer in self.layers:
            try:
                return layer.resolve(ref)
            except BundleNotFoundError as exc:  # the message of a layer that knows the name says more
                errors.insert(0, exc) if _versions(layer, name) else errors.append(exc)
        raise errors[0]

    def list(self) -> list[BundleInfo]:
        """Every readable name of every layer (sorted): versions oldest layer first, `latest` as
        `resolve(name)`."""
        return self.scan().bundles

    def scan(self) -> StoreListing:
        """`list`, plus every layer's names whose index cannot be read (`BundleStore.scan`)."""
        names: dict[str, list[str]] = {}
        broken: list[BrokenName] = []
        for layer in reversed(self.layers):
            listing = layer.scan()
            broken.extend(listing.broken)
            for info in listing.bundles:
                names.setdefault(info.name, []).extend(v for v in info.versions if v not in names[info.name])
        out = []
        for name in sorted(names):
            try:
                out.append(BundleInfo(name, names[name], self.resolve(name)))
            except BundleError:  # deleted meanwhile, or unreadable in another layer
                continue
        return StoreListing(out, broken)

    def inspect(self, ref: str) -> builtins.list[VersionInfo]:
        """Every version of `name` across the layers (oldest layer first), or the one `name@version` names."""
        name, version = parse_ref(ref)
        latest = self.resolve(name)
        if version is not None:
            layers = [self.layer_of(self.resolve(ref))]
        else:
            layers = [layer for layer in reversed(self.layers) if _versions(layer, name)]
        out = []
        for layer in layers:
            for info in layer.inspect(ref):
                is_latest = info.version == latest.version and layer is self.layer_of(latest)
                out.append(dataclasses.replace(info, latest=is_latest))
        return out

    def load(
        self, ref: str | BundleRef, spec: ModelSpec | None = None, limits: BundleLimits = DEFAULT_LIMITS
    ) -> LoadedBundle:
        """Resolve across the layers, then load and check it as `BundleStore.load` does."""
        bundle_ref = self.resolve(ref) if isinstance(ref, str) else ref
        return self.layer_of(bundle_ref).load(bundle_ref, spec, limits)

    # ---- write ---------------------------------------------------------------------------------------------
    def publish(
        self,
        src: str | os.PathLike[str],
        name: str | None = None,
        version: str | None = None,
        spec: ModelSpec | None = None,
        limits: BundleLimits = DEFAULT_LIMITS,
    ) -> BundleRef:
        """Publish a bundle directory into the writable layer."""
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
        """Validate and publish into the writable layer, numbering after the read-only layers' versions."""
        target = name or _manifest_name(manifest_bytes)
        try:
            shadowed = [v for layer in self.read_only for v in (_versions(layer, target) if target else [])]
        except BundleError:  # a bad name: the writable store reports it in its ordered validation
            return self.writable.publish_files(manifest_bytes, tensor_bytes, spec, limits, name, version)
        if version is not None and version in shadowed:
            raise BundleConflictError(
                f"{target}@{version} already exists (a shipped, read-only bundle); publish under a new "
                "version (or omit the version to get the next v<N>)"
            )
        floor = max((int(m.group(1)) for v in shadowed if (m := _AUTO.fullmatch(v))), default=0)
        if version is not None or floor == 0 or target is None:
            return self.writable.publish_files(manifest_bytes, tensor_bytes, spec, limits, name, version)
        for _ in range(
            _PUBLISH_RETRIES
        ):  # concurrent publishers of one name: the loser takes the next number
            index = read_index(self.writable._name_dir(target), target)
            candidate = f"v{max(index.next_auto, floor + 1)}"
            try:
                return self.writable.publish_files(
                    manifest_bytes, tensor_bytes, spec, limits, name, candidate
                )
            except BundleConflictError:
                continue
        raise BundleConflictError(f"could not allocate a new version of {target}; try again")

    def delete(self, name: str, version: str | None = None) -> builtins.list[BundleRef]:
        """Delete from the writable layer (and the curves training wrote beside it); see the module
        contract."""
        mine = _versions(self.writable, name)
        for layer in self.read_only:
            theirs = _versions(layer, name)
            if (version is None and theirs and not mine) or (version in theirs and version not in mine):
                return layer.delete(name, version)  # raises BundleReadOnlyError
        refs = self.writable.delete(name, version)
        for ref in refs:
            curves = self.writable.root / f"{ref.label}{CURVES_SUFFIX}"
            if curves.is_file():
                curves.unlink()
        return refs


def _manifest_name(manifest_bytes: bytes) -> str | None:
    """The manifest's `name`, when it can be read (validation reports any problem properly later)."""
    try:
        name = json.loads(manifest_bytes).get("name")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def open_layered_store(
    writable: str | os.PathLike[str], read_only: list[str | os.PathLike[str]] | None = None
) -> LayeredBundleStore:
    """The writable store (created if missing) with the read-only stores that exist behind it; a read-only
    directory that is the writable one itself is skipped."""
    store = BundleStore(Path(writable).expanduser())
    layers = [
        ReadOnlyBundleStore(Path(p).expanduser())
        for p in read_only or []
        if Path(p).expanduser().is_dir() and not same_dir(p, writable)
    ]
    log.info("bundle store %s (writable)%s", store.root, "".join(f" + {x.root} (read-only)" for x in layers))
    return LayeredBundleStore(store, layers)
