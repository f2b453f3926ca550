"""The writable user store layered over read-only stores (the shipped demo bundles): reads see both, writes go
to the user store only, versions continue after the demo's, deleting a demo bundle is a clear 403, `rm`
leaves no debris, the read-only directory is never written (not even lock or temp directories); through the
store, the `m2pt bundle` CLI (also against the real `demo/bundles`) and the ops API."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from api_fakes import FakeEngine
from fastapi.testclient import TestClient
from pydantic import SecretStr
from store_helpers import tiny_prompts

from prompts_store.cli import main as bundle_main
from prompts_store.errors import BundleConflictError, BundleNotFoundError
from prompts_store.format import encode_bundle, save_bundle
from prompts_store.layered import (
    DEMO_STORE_DIR,
    BundleReadOnlyError,
    LayeredBundleStore,
    ReadOnlyBundleStore,
    open_layered_store,
    user_store_dir,
)
from prompts_store.store import BundleStore

OPS = "ops-token-for-tests"


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too) with the sha256 of files: any write shows."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def src(tiny, tmp_path):
    def make(name: str, seed: int) -> Path:
        return save_bundle(tmp_path / f"src-{name}-{seed}", tiny_prompts(tiny, seed=seed), tiny.spec, name)

    return make


@pytest.fixture
def demo_dir(tmp_path, src):
    """A store like demo/bundles: `digits@v1`, published once, then only read."""
    BundleStore(tmp_path / "demo").publish(src("digits", 1))
    for hidden in (".locks", ".tmp"):  # the shipped tree has none (they are git-ignored)
        for p in sorted((tmp_path / "demo" / hidden).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (tmp_path / "demo" / hidden).rmdir()
    return tmp_path / "demo"


def test_user_store_default_is_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("M2PT_STORE", raising=False)
    monkeypatch.setenv("M2PT_HOME", str(tmp_path / "home"))
    assert user_store_dir() == tmp_path / "home" / "bundles"
    monkeypatch.delenv("M2PT_HOME")
    assert user_store_dir() == Path("~/.local/share/m2pt/bundles").expanduser()
    monkeypatch.setenv("M2PT_STORE", str(tmp_path / "explicit"))
    assert user_store_dir() == tmp_path / "explicit"


def test_layered_reads_writes_and_deletes(demo_dir, tmp_path, src):
    before = tree_snapshot(demo_dir)
    store = open_layered_store(tmp_path / "user", [demo_dir])
    assert [(i.name, i.versions, i.latest.label) for i in store.list()] == [("digits", ["v1"], "digits@v1")]

    ref = store.publish(src("digits", 2))
    assert ref.label == "digits@v2"  # continues after the demo's v1: never a second digits@v1
    assert ref.path.parent.parent == tmp_path / "user"
    assert store.resolve("digits").label == "digits@v2"
    assert store.resolve("digits@v1").path.parent.parent == demo_dir
    assert [(v.version, v.latest) for v in store.inspect("digits")] == [("v1", False), ("v2", True)]
    assert store.load("digits@v1").content_hash == store.resolve("digits@v1").content_hash
    with pytest.raises(BundleConflictError, match="shipped, read-only"):
        store.publish(src("digits", 3), version="v1")

    with pytest.raises(BundleReadOnlyError, match="digits@v1 is a shipped bundle in a read-only store") as e:
        store.delete("digits", "v1")
    assert e.value.status == 403 and e.value.error_type == "bundle_read_only"
    assert [r.label for r in store.delete("digits")] == ["digits@v2"]  # the user's versions only
    assert store.resolve("digits").label == "digits@v1"
    with pytest.raises(BundleReadOnlyError):
        store.delete("digits")
    with pytest.raises(BundleNotFoundError):
        store.delete("nope")
    assert tree_snapshot(demo_dir) == before  # nothing written, not even .locks/ or .tmp/


def test_read_only_store_refuses_writes_and_creates_nothing(demo_dir, tmp_path, src):
    before = tree_snapshot(demo_dir)
    ro = ReadOnlyBundleStore(demo_dir)
    with pytest.raises(BundleReadOnlyError):
        ro.publish(src("size", 0))
    assert ro.resolve("digits").label == "digits@v1"
    assert tree_snapshot(demo_dir) == before
    with pytest.raises(Exception, match="not a directory"):
        ReadOnlyBundleStore(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_concurrent_publishers_over_a_demo_name_get_distinct_versions(demo_dir, tmp_path, src):
    import concurrent.futures as cf

    store = open_layered_store(tmp_path / "user", [demo_dir])
    dirs = [src("digits", 10 + i) for i in range(4)]
    with cf.ThreadPoolExecutor(4) as pool:
        labels = sorted(r.label for r in pool.map(store.publish, dirs))
    assert labels == ["digits@v2", "digits@v3", "digits@v4", "digits@v5"]


def _bundle(capsys, *argv: str) -> tuple[int, str, str]:
    code = bundle_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_rm_leaves_no_debris(tmp_path, capsys, src):
    store = tmp_path / "user"
    trained = src("mine", 0)
    (trained.parent / "src-mine-0.curves.png").write_bytes(b"png")
    code, out, _ = _bundle(capsys, "publish", str(trained), "--store", str(store))
    assert code == 0 and '"bundle": "mine@v1"' in out
    from training.export import curves_path

    (store / "mine@v1.curves.png").write_bytes(curves_path(trained).read_bytes())  # as training publishes
    code, out, err = _bundle(capsys, "rm", "mine", "--store", str(store))
    assert (code, out.strip()) == (0, "deleted mine@v1"), err
    rel = [p.relative_to(store) for p in store.rglob("*")]
    visible = sorted(str(r) for r in rel if not r.parts[0].startswith("."))
    assert visible == ["mine", "mine/index.json"]  # the index keeps the next version number, nothing else
    assert not any((store / ".tmp").iterdir())


def test_cli_rm_of_a_shipped_demo_bundle_is_refused(capsys):
    before = tree_snapshot(DEMO_STORE_DIR)
    code, out, err = _bundle(capsys, "rm", "digits@v1")
    assert code == 1 and out == ""
    assert "digits@v1 is a shipped bundle in a read-only store" in err and "[bundle_read_only]" in err
    code, _, err = _bundle(
        capsys, "publish", str(DEMO_STORE_DIR / "digits" / "v1"), "--store", "demo/bundles"
    )
    assert code == 1 and "holds the shipped demo bundles and is read-only" in err
    assert tree_snapshot(DEMO_STORE_DIR) == before


def test_cli_inspect_accepts_what_the_docs_show(capsys, monkeypatch):
    monkeypatch.chdir(DEMO_STORE_DIR.parents[1])
    for target, extra in [
        ("demo/bundles/digits", []),  # a name directory inside a store (README)
        ("demo/bundles/digits@v1", []),  # STORE_DIR/NAME@VERSION
        ("digits", []),  # NAME in the default view: user store + demo bundles
        ("digits@v1", ["--store", "demo/bundles"]),
    ]:
        code, out, err = _bundle(capsys, "inspect", target, *extra)
        assert code == 0, (target, err)
        assert '"label": "digits@v1"' in out and '"eval_exact_match"' in out
    code, out, _ = _bundle(capsys, "inspect", "demo/bundles/digits/v1")  # a bundle directory
    assert code == 0 and '"label": "digits@v1"' in out and '"content_hash"' in out


def test_cli_mistyped_store_errors_and_creates_nothing(capsys, tmp_path):
    typo = tmp_path / "bundels"
    for argv in (["list", "--store", str(typo)], ["inspect", "digits", "--store", str(typo)]):
        code, out, err = _bundle(capsys, *argv)
        assert code == 1 and out == ""
        assert f"--store {typo}: no such bundle store directory" in err
    code, _, err = _bundle(capsys, "rm", "digits", "--store", str(typo))
    assert code == 1 and "no such bundle store directory" in err
    assert not typo.exists()


def test_cli_list_shows_the_demo_bundles_beside_the_user_store(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("M2PT_HOME", str(tmp_path / "fresh-home"))
    code, out, _ = _bundle(capsys, "list", "--json")
    assert code == 0
    assert {"digits", "size"} <= {row["name"] for row in __import__("json").loads(out)}
    assert not user_store_dir().exists()  # reading never creates the user store


def test_ops_api_uploads_to_the_user_store_and_refuses_demo_deletes(tiny, demo_dir, tmp_path):
    from server.app import create_app
    from server.settings import Settings

    before = tree_snapshot(demo_dir)
    store = LayeredBundleStore(BundleStore(tmp_path / "user"), [ReadOnlyBundleStore(demo_dir)])
    app = create_app(
        Settings(api_key=None, ops_token=SecretStr(OPS), store=tmp_path / "user"),
        FakeEngine(store=store),
        store=store,
        spec=tiny.spec,
    )
    auth = {"Authorization": f"Bearer {OPS}"}
    manifest, tensors = encode_bundle(tiny_prompts(tiny, seed=5), tiny.spec, "digits", None, {})
    with TestClient(app, raise_server_exceptions=False) as client:
        files = {"manifest": ("manifest.json", manifest), "tensors": ("tensors.safetensors", tensors)}
        up = client.post("/v1/bundles", files=files, headers=auth)
        assert up.status_code == 201, up.text
        assert up.json()["bundle"] == "digits@v2"
        gone = client.delete("/v1/bundles/digits@v1", headers=auth)
        assert gone.status_code == 403
        assert gone.json()["error"]["type"] == "bundle_read_only"
        assert "shipped bundle in a read-only store" in gone.json()["error"]["message"]
        assert str(demo_dir) not in gone.text  # no server paths in messages
        listed = client.get("/v1/bundles", headers=auth).json()
        assert str(listed).count("digits") >= 1
        assert client.delete("/v1/bundles/digits", headers=auth).status_code == 200
        assert client.delete("/v1/bundles/digits", headers=auth).status_code == 403
    assert (tmp_path / "user" / "digits" / "index.json").is_file()
    assert tree_snapshot(demo_dir) == before


def test_serve_store_flags(tmp_path):
    import argparse

    from server.cli import add_serve_command, settings_from_args
    from server.settings import Settings, SettingsError

    parser = argparse.ArgumentParser(prog="m2pt")
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--store", str(tmp_path / "u"), "--demo-store", str(tmp_path)])
    settings = settings_from_args(args)
    assert (settings.store, settings.read_only_stores) == (tmp_path / "u", [tmp_path])
    assert Settings(model="llava-hf/llava-1.5-7b-hf").read_only_stores == []  # demo bundles fit the demo only
    with pytest.raises(SettingsError, match="--demo-store .* is not a directory"):
        Settings(demo_store=tmp_path / "typo").check_paths()
