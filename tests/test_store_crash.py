"""SIGKILL in the middle of a publish (or delete): a publisher subprocess is stopped at a chosen step (it
blocks there and says so), killed with SIGKILL, and the store is reopened. It must show exactly the old
state or exactly the new one, every listed bundle must load with its recorded content hash, the debris must
be swept, and the store must keep working (the dead process's locks are gone)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_helpers import tiny_prompts

from prompts_store.format import load_bundle, save_bundle
from prompts_store.store import BundleStore

_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import prompts_store.store as st
    from m2pt.spec import ModelSpec
    root, spec_path, src, point = sys.argv[1:]
    spec = ModelSpec.from_json(json.load(open(spec_path)))
    real_write, real_rename, real_replace = st.write_durable, os.rename, os.replace

    def pause():
        sys.stdout.write("PAUSED\\n")
        sys.stdout.flush()
        time.sleep(600)

    def after(real):
        def run(*args):
            real(*args)
            pause()
        return run

    if point == "staging_tensors":      # tensors file written into .tmp/<id>/, nothing else
        st.write_durable = after(real_write)
    elif point == "staging_complete":   # staged dir complete and fsynced, not yet renamed into place
        os.rename = lambda *a: pause()
    elif point == "renamed":            # version dir in place, index.json not yet rewritten
        os.rename = after(real_rename)
    elif point == "index_tmp":          # new index written to its temp file, not yet swapped in
        os.replace = lambda *a: pause()
    elif point == "index_replaced":     # commit point passed, directory fsync not yet done
        os.replace = after(real_replace)
    elif point == "delete_committed":   # delete: index rewritten, the version dir not yet removed
        os.rename = lambda *a: pause()
    store = st.BundleStore(root)
    if point.startswith("delete"):
        store.delete("colors", "v2")
    else:
        store.publish(src, spec=spec)
    sys.stdout.write("FINISHED\\n")
    """
)

# point -> (versions after recovery, debris that must exist right after the kill (relative to the store root))
POINTS = {
    "staging_tensors": (["v1"], ".tmp/*"),
    "staging_complete": (["v1"], ".tmp/*/manifest.json"),
    "renamed": (["v1"], "colors/v2/manifest.json"),
    "index_tmp": (["v1"], "colors/.index.json.tmp-*"),
    "index_replaced": (["v1", "v2"], None),
    "delete_committed": (["v1"], "colors/v2/manifest.json"),
}


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash_src")
    (root / "spec.json").write_text(json.dumps(tiny.spec.to_json()))
    return [
        save_bundle(root / f"s{i}", tiny_prompts(tiny, seed=i), tiny.spec, "colors") for i in range(3)
    ], root


def _run_until_paused(store_root: Path, spec_path: Path, src: Path, point: str) -> None:
    cmd = [sys.executable, "-c", _CHILD, str(store_root), str(spec_path), str(src), point]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        line = proc.stdout.readline().strip()
        assert line == "PAUSED", f"child did not reach {point}: {line!r} {proc.stderr.read()[-2000:]}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", sorted(POINTS))
def test_sigkill_mid_publish_leaves_old_or_new_state(point, sources, tiny, tmp_path):
    srcs, src_root = sources
    root = tmp_path / "store"
    store = BundleStore(root)
    store.publish(srcs[0], spec=tiny.spec)
    if point.startswith("delete"):
        store.publish(srcs[1], spec=tiny.spec)
    _run_until_paused(root, src_root / "spec.json", srcs[1], point)

    expected_versions, debris = POINTS[point]
    if debris:  # the kill really happened mid-way
        assert list(root.glob(debris)), f"expected debris {debris} after killing at {point}"
    reopened = BundleStore(root)  # sweeps
    [info] = reopened.list()
    assert info.versions == expected_versions and info.latest.version == expected_versions[-1]
    for version, src in zip(expected_versions, srcs, strict=False):
        loaded = reopened.load(f"colors@{version}", tiny.spec)
        assert loaded.content_hash == load_bundle(src).content_hash
    assert os.listdir(root / ".tmp") == []
    assert sorted(os.listdir(root / "colors")) == sorted(["index.json", *expected_versions])
    fresh = reopened.publish(srcs[2], spec=tiny.spec)  # locks of the dead process are gone
    assert reopened.load(fresh, tiny.spec).content_hash == load_bundle(srcs[2]).content_hash
    assert fresh.version not in expected_versions


def test_sweep_waits_while_a_publish_is_in_flight(sources, tiny, tmp_path):
    """Opening a store while another process is mid-publish must not delete that publisher's staging dir."""
    from prompts_store.store_index import flocked

    srcs, _ = sources
    root = tmp_path / "store"
    store = BundleStore(root)
    staged = root / ".tmp" / "in-flight"
    staged.mkdir()
    with flocked(root / ".locks" / "store.lock", shared=True):  # what a live publisher holds
        assert BundleStore(root).sweep() is False
        assert staged.exists()
    assert store.sweep() is True and not staged.exists()
