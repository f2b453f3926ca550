"""BundleStore: versions, latest, content hashes, inspect/list/delete, names, conflicts and concurrent
publishers (20 threads, and several processes) with no lost or corrupted version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from store_helpers import tiny_prompts, tree

from prompts_store.errors import (
    BundleConflictError,
    BundleHashError,
    BundleNameError,
    BundleNotFoundError,
    BundleStoreError,
)
from prompts_store.format import load_bundle, save_bundle
from prompts_store.store import BundleStore

BAD_NAMES = ["../x", "a/b", "", "x" * 300, "Caps", ".hidden", "a b", "x\x00y", "é", "-lead", "a@b@c"]


@pytest.fixture
def bundles(tiny, tmp_path):
    """Three different bundles for the tiny model (seeds 0, 1, 2)."""
    return [
        save_bundle(tmp_path / f"src{i}", tiny_prompts(tiny, seed=i), tiny.spec, "colors") for i in range(3)
    ]


def test_versions_latest_and_content_hash(tiny, tmp_path, bundles):
    store = BundleStore(tmp_path / "store")
    r1 = store.publish(bundles[0], spec=tiny.spec)
    r2 = store.publish(bundles[1], spec=tiny.spec)
    assert (r1.label, r2.label) == ("colors@v1", "colors@v2")
    assert store.resolve("colors") == r2 and store.resolve("colors@v1") == r1
    assert r1.content_hash == load_bundle(bundles[0]).content_hash != r2.content_hash
    loaded = store.load("colors@v1", tiny.spec)
    assert torch.equal(loaded.prompts.text, load_bundle(bundles[0]).prompts.text)
    assert (loaded.manifest.name, loaded.manifest.version, loaded.label) == ("colors", "v1", "colors@v1")
    r3 = store.publish(bundles[0], spec=tiny.spec)  # same content again: a new version, the same content hash
    assert r3.label == "colors@v3" and r3.content_hash == r1.content_hash
    [info] = store.list()
    assert (info.name, info.versions, info.latest) == ("colors", ["v1", "v2", "v3"], r3)


def test_explicit_versions_and_conflict(tiny, tmp_path, bundles):
    store = BundleStore(tmp_path / "store")
    assert (
        store.publish(bundles[0], name="digits", version="2024.06-a", spec=tiny.spec).label
        == "digits@2024.06-a"
    )
    before = tree(store.root)
    with pytest.raises(BundleConflictError, match="immutable; publish under a new version"):
        store.publish(bundles[1], name="digits", version="2024.06-a", spec=tiny.spec)
    assert tree(store.root) == before
    assert store.publish(bundles[1], name="digits", version="v7", spec=tiny.spec).label == "digits@v7"
    assert store.publish(bundles[2], name="digits", spec=tiny.spec).label == "digits@v8"  # auto skips past v7
    assert store.resolve("digits").version == "v8"


def test_inspect_shows_versions_sizes_shapes_provenance(tiny, tmp_path):
    src = save_bundle(
        tmp_path / "s",
        tiny_prompts(tiny),
        tiny.spec,
        "colors",
        provenance={"dataset": "shapes", "steps": 50, "metrics": {"exact_match": 0.97}},
    )
    store = BundleStore(tmp_path / "store")
    store.publish(src, spec=tiny.spec)
    store.publish(src, spec=tiny.spec)
    v1, v2 = store.inspect("colors")
    assert (v1.version, v1.latest, v2.version, v2.latest) == ("v1", False, "v2", True)
    info = v2.to_json()
    assert info["label"] == "colors@v2" and info["metrics"] == {"exact_match": 0.97}
    assert info["provenance"]["dataset"] == "shapes" and info["provenance"]["steps"] == 50
    assert info["shapes"]["text_prompts"] == [tiny.spec.llm_layers, 3, tiny.spec.llm_dim]
    assert info["size_bytes"] == sum(f.stat().st_size for f in (store.root / "colors" / "v2").iterdir())
    assert info["created_at"] and info["published_at"] and info["has_projector"] is True
    assert info["base_model"]["fingerprint"] == tiny.spec.fingerprint()
    json.dumps(info)  # JSON-ready for the HTTP layer
    assert [v.version for v in store.inspect("colors@v1")] == ["v1"]


def test_delete_version_and_name(tiny, tmp_path, bundles):
    store = BundleStore(tmp_path / "store")
    for b in bundles:
        store.publish(b, spec=tiny.spec)
    assert [r.label for r in store.delete("colors", "v3")] == ["colors@v3"]
    assert store.resolve("colors").version == "v2"  # latest moves back
    with pytest.raises(BundleNotFoundError, match="no version 'v3'; published versions: v1, v2"):
        store.resolve("colors@v3")
    assert store.publish(bundles[0], spec=tiny.spec).version == "v4"  # numbers are never reused
    assert sorted(r.label for r in store.delete("colors")) == ["colors@v1", "colors@v2", "colors@v4"]
    assert store.list() == []
    with pytest.raises(BundleNotFoundError, match="no bundle named 'colors'"):
        store.resolve("colors")
    with pytest.raises(BundleNotFoundError, match="no bundle colors to delete"):
        store.delete("colors")
    assert (
        sorted(os.listdir(store.root / "colors")) == ["index.json"] and os.listdir(store.root / ".tmp") == []
    )
    assert store.publish(bundles[1], spec=tiny.spec).version == "v5"


def test_load_after_delete_is_not_found(tiny, tmp_path, bundles):
    store = BundleStore(tmp_path / "store")
    ref = store.publish(bundles[0], spec=tiny.spec)
    store.delete("colors")
    with pytest.raises(BundleNotFoundError, match="was deleted"):
        store.load(ref, tiny.spec)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_names_are_refused_before_any_path_is_built(tiny, tmp_path, bundles, bad):
    store = BundleStore(tmp_path / "store")
    before = tree(tmp_path)
    for call in (
        lambda: store.publish(bundles[0], name=bad, spec=tiny.spec),
        lambda: store.publish(bundles[0], version=bad, spec=tiny.spec),
        lambda: store.resolve(bad),
        lambda: store.resolve(f"colors@{bad}"),
        lambda: store.inspect(bad),
        lambda: store.delete(bad),
    ):
        with pytest.raises(BundleNameError, match="use 1 to 64 characters"):
            call()
    assert tree(tmp_path) == before


def test_tampered_version_is_refused(tiny, tmp_path, bundles):
    store = BundleStore(tmp_path / "store")
    ref = store.publish(bundles[0], spec=tiny.spec)
    os.remove(ref.path / "tensors.safetensors")
    os.remove(ref.path / "manifest.json")
    for name in ("tensors.safetensors", "manifest.json"):  # swap in another valid bundle's files
        (ref.path / name).write_bytes((bundles[1] / name).read_bytes())
    with pytest.raises(BundleHashError, match="the store index says"):
        store.load(ref, tiny.spec)


def test_symlinked_name_is_refused(tiny, tmp_path, bundles):
    store = BundleStore(tmp_path / "store")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, store.root / "evil")
    with pytest.raises(BundleStoreError, match="symlink"):
        store.publish(bundles[0], name="evil", spec=tiny.spec)
    assert os.listdir(elsewhere) == [] and store.list() == []


def test_twenty_concurrent_thread_publishers(tiny, tmp_path):
    n = 20
    srcs = [
        save_bundle(tmp_path / f"s{i}", tiny_prompts(tiny, seed=i), tiny.spec, "shared") for i in range(n)
    ]
    store = BundleStore(tmp_path / "store")
    refs, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def publish(i: int) -> None:
        try:
            barrier.wait()
            refs[i] = BundleStore(tmp_path / "store").publish(srcs[i], spec=tiny.spec)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.version for r in refs) == sorted(f"v{i}" for i in range(1, n + 1))
    for i, ref in enumerate(refs):  # every version holds exactly what its publisher sent
        loaded = store.load(ref.label, tiny.spec)
        assert loaded.content_hash == load_bundle(srcs[i]).content_hash
        assert torch.equal(loaded.prompts.visual, load_bundle(srcs[i]).prompts.visual)
    assert store.list()[0].versions == [f"v{i}" for i in range(1, n + 1)]  # index order = allocation order
    assert os.listdir(store.root / ".tmp") == []


_PUBLISHER = textwrap.dedent(
    """
    import json, sys
    from m2pt.spec import ModelSpec
    from prompts_store.store import BundleStore
    root, spec_path, *srcs = sys.argv[1:]
    spec = ModelSpec.from_json(json.load(open(spec_path)))
    sys.stdout.write(json.dumps([BundleStore(root).publish(s, spec=spec).label for s in srcs]))
    """
)


def test_concurrent_process_publishers(tiny, tmp_path):
    procs, per = 3, 3
    srcs = [
        save_bundle(tmp_path / f"s{i}", tiny_prompts(tiny, seed=i), tiny.spec, "multi")
        for i in range(procs * per)
    ]
    (tmp_path / "spec.json").write_text(json.dumps(tiny.spec.to_json()))
    cmd = [sys.executable, "-c", _PUBLISHER, str(tmp_path / "store"), str(tmp_path / "spec.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running = [
        subprocess.Popen(
            cmd + [str(s) for s in srcs[p * per : (p + 1) * per]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        for p in range(procs)
    ]
    labels = []
    for p in running:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        labels += json.loads(out)
    assert sorted(labels) == sorted(f"multi@v{i}" for i in range(1, procs * per + 1))
    store = BundleStore(tmp_path / "store")
    hashes = {load_bundle(s).content_hash for s in srcs}
    assert {store.load(label, tiny.spec).content_hash for label in labels} == hashes


def test_publish_a_loaded_bundle(tiny, tmp_path, bundles):
    store = BundleStore(tmp_path / "store")
    loaded = load_bundle(bundles[0], tiny.spec)
    ref = store.publish(loaded, name="reloaded", spec=tiny.spec)
    assert ref.label == "reloaded@v1" and ref.content_hash == loaded.content_hash  # fp32 in, same bytes
    again = store.load(ref, tiny.spec)
    assert torch.equal(again.prompts.text, loaded.prompts.text)
    assert again.manifest.provenance == loaded.manifest.provenance
