"""Store-level regression tests of issue 9: the name grammar (defect 1), unreadable names isolated (defect 1),
no paths in messages (defect 2), the bounded safetensors header check (defect 6), and a disk that fills up
during a publish. Each compares a sha256 of every file of the store before and after."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
from store_helpers import tiny_prompts

from prompts_store import store as store_module
from prompts_store.errors import (
    BundleHashError,
    BundleNameError,
    BundleNotSafetensorsError,
    BundleStoreError,
    BundleStoreFullError,
)
from prompts_store.format import save_bundle
from prompts_store.names import is_valid, parse_ref, validate_version
from prompts_store.st_header import MAX_DIMS, MAX_TENSORS, parse_header
from prompts_store.store import BundleStore


def store_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


@pytest.fixture
def src(tiny, tmp_path):
    return save_bundle(tmp_path / "src", tiny_prompts(tiny), tiny.spec, "colors")


@pytest.fixture
def store(tiny, tmp_path, src):
    store = BundleStore(tmp_path / "store")
    for name in ("colors", "shapes"):
        store.publish(src, name=name, spec=tiny.spec)
    return store


VALID = ["v1", "v12", "colors", "digits-v2", "a", "0", "my_bundle", "v1.2.3", "x" * 64, "index2", "latest1"]
INVALID = [
    "", ".", "..", ".tmp", ".locks", "index.json", "a.json", "x.lock", "y.tmp", "tensors.safetensors",
    "latest", "index", "con", "nul.txt", "lpt1", "Colors", "V1", "a..b", "a-", "-a", "_a", "a.", "a/b",
    "a\\b", "a b", "é", "a\x00", "x" * 65, "a@b", 5, None,
]  # fmt: skip


@pytest.mark.parametrize("value", VALID)
def test_valid_identifiers(value):
    assert is_valid(value) and validate_version(value) == value


@pytest.mark.parametrize("value", INVALID)
def test_invalid_identifiers(value):
    assert not is_valid(value)
    with pytest.raises(BundleNameError, match="invalid bundle version"):
        validate_version(value)
    if isinstance(value, str) and "@" not in value:
        with pytest.raises(BundleNameError):
            parse_ref(f"colors@{value}")


@pytest.mark.parametrize("version", ["index.json", "latest", ".tmp", "INDEX.JSON", "colors.lock"])
def test_publish_cannot_replace_store_metadata(store, src, tiny, version):
    before = store_hashes(store.root)
    with pytest.raises(BundleNameError, match="invalid bundle version"):
        store.publish(src, name="colors", version=version, spec=tiny.spec)
    with pytest.raises(BundleNameError, match="invalid bundle name"):
        store.publish(src, name=version, spec=tiny.spec)
    assert store_hashes(store.root) == before
    assert [i.latest.label for i in store.list()] == ["colors@v1", "shapes@v1"]


@pytest.mark.parametrize(
    "index",
    [
        b"{ not json",
        b"",
        json.dumps({"format": 1, "name": "shapes", "next_auto": 2, "versions": [{"version": "index.json"}]}),
        json.dumps(
            {
                "format": 1,
                "name": "shapes",
                "next_auto": 2,
                "versions": [{"version": "../colors", "content_hash": "x", "published_at": "y"}],
            }
        ),
        json.dumps({"format": 1, "name": "shapes", "next_auto": "2", "versions": []}),
    ],
)
def test_an_unreadable_index_isolates_its_name(store, tiny, index):
    raw = index if isinstance(index, bytes) else index.encode()
    (store.root / "shapes" / "index.json").write_bytes(raw)
    before = store_hashes(store.root)
    reopened = BundleStore(store.root)  # the sweep skips the broken name instead of failing to open
    listing = reopened.scan()
    assert [i.name for i in listing.bundles] == ["colors"]
    [broken] = listing.broken
    assert broken.name == "shapes" and broken.error_type == "bundle_store"
    assert str(store.root) not in broken.message and "bundle 'shapes'" in broken.message
    assert reopened.load("colors", tiny.spec).manifest.name == "colors"
    with pytest.raises(BundleStoreError) as info:
        reopened.resolve("shapes")
    assert str(store.root) not in str(info.value)
    assert store_hashes(store.root) == before
    assert [r.label for r in reopened.delete("shapes")] == ["shapes@*"]
    assert reopened.scan().broken == [] and not (store.root / "shapes").exists()


def test_a_corrupt_version_is_refused_naming_the_bundle_only(store, tiny):
    tensors = store.root / "shapes" / "v1" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(BundleHashError) as info:
        store.load("shapes", tiny.spec)
    assert "tensor " in str(info.value) and "sha256" in str(info.value)
    assert str(store.root) not in str(info.value)
    assert store.load("colors", tiny.spec).manifest.name == "colors"


def test_disk_full_during_publish_leaves_nothing(store, src, tiny, monkeypatch):
    before = store_hashes(store.root)
    real = store_module.write_durable
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the staged tensors went through; the manifest hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(store_module, "write_durable", full_disk)
    with pytest.raises(BundleStoreFullError) as info:
        store.publish(src, name="colors", spec=tiny.spec)
    message = str(info.value)
    assert info.value.status == 507 and info.value.error_type == "bundle_store_full"
    assert "could not publish colors" in message and "disk is full" in message
    assert str(store.root) not in message
    assert calls["n"] == 2
    monkeypatch.setattr(store_module, "write_durable", real)
    assert store_hashes(store.root) == before
    assert not any((store.root / ".tmp").iterdir())
    reopened = BundleStore(store.root)
    assert [i.latest.label for i in reopened.list()] == ["colors@v1", "shapes@v1"]
    assert reopened.publish(src, name="colors", spec=tiny.spec).label == "colors@v2"  # v2 was not used up


def _header(entries: dict) -> bytes:
    text = json.dumps(entries).encode()
    return len(text).to_bytes(8, "little") + text


def test_header_refuses_duplicates_and_bounds_its_work():
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    dup = b'{"a":' + entry + b',"a":' + entry + b"}"
    with pytest.raises(BundleNotSafetensorsError, match="header names 'a' twice"):
        parse_header(len(dup).to_bytes(8, "little") + dup + b"\0" * 4, 1 << 20)
    many = {
        f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(MAX_TENSORS + 1)
    }
    with pytest.raises(BundleNotSafetensorsError, match=f"over the cap of {MAX_TENSORS}"):
        parse_header(_header(many) + b"\0" * (MAX_TENSORS + 1), 1 << 20)
    deep = {"t": {"dtype": "F32", "shape": [1] * (MAX_DIMS + 1), "data_offsets": [0, 4]}}
    with pytest.raises(BundleNotSafetensorsError, match=f"at most {MAX_DIMS} dimensions") as info:
        parse_header(_header(deep) + b"\0" * 4, 1 << 20)
    assert len(str(info.value)) < 400
    ok = {"t": {"dtype": "F32", "shape": [1] * MAX_DIMS, "data_offsets": [0, 4]}}
    assert parse_header(_header(ok) + b"\0" * 4, 1 << 20).tensors["t"].shape == (1,) * MAX_DIMS
    long_name = {"n" * 100_000: {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    with pytest.raises(BundleNotSafetensorsError) as info:
        parse_header(_header(long_name) + b"\0" * 4, 1 << 20)
    assert len(str(info.value)) <= 1000
