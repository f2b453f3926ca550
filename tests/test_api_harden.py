"""Regression tests of issue 9's defects 1, 2, 4, 5 and 6 over HTTP: a real bundle store behind the real app
(fake engine), served by a real uvicorn and driven by httpx. Each checks status, error type, message, and
that the store is byte-identical before and after (a sha256 of every file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from api_fakes import FakeEngine, LiveServer

from m2pt.prompts import init_prompts
from prompts_store.format import encode_bundle
from prompts_store.store import BundleStore
from server.app import create_app
from server.settings import Settings

TOKEN = "ops-token-abcdef"
KEY = "chat-key-abcdef"
OPS = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"Authorization": f"Bearer {KEY}"}


def store_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under the store (lock files excluded: flock creates them on reads too)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def bundle_files(spec, name="keep", seed=0) -> tuple[bytes, bytes]:
    return encode_bundle(init_prompts(spec, 3, 2, seed=seed), spec, name, None, {"dataset": "test"})


def upload(url, manifest: bytes, tensors: bytes, **fields) -> httpx.Response:
    files = {
        "manifest": ("manifest.json", manifest, "application/json"),
        "tensors": ("tensors.safetensors", tensors, "application/octet-stream"),
    }
    return httpx.post(url + "/v1/bundles", files=files, data=fields, headers=OPS, timeout=30)


@pytest.fixture
def store(tmp_path, tiny):
    store = BundleStore(tmp_path / "store")
    for name in ("keep", "other"):
        store.publish_files(*bundle_files(tiny.spec, name), tiny.spec)
    return store


@pytest.fixture
def live(store, tiny):
    settings = Settings(api_key=KEY, ops_token=TOKEN, store=store.root, max_bundle_bytes=1024 * 1024)
    with LiveServer(create_app(settings, FakeEngine(store=store), store=store, spec=tiny.spec)) as server:
        yield server


def chat(url, bundle: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat", json={"instruction": "hi", "bundle": bundle}, headers=CHAT, timeout=30
    )


COLLIDING_VERSIONS = [
    "index.json", "INDEX.JSON", "Index.json", "latest", ".", "..", ".tmp", ".locks", "store.lock",
    "keep.lock", ".index.json.tmp-1", "v1.tmp", "tensors.safetensors", "manifest.json", "V1", "con", "a..b",
    "v1.", "-v1", "v1/..", "%2e%2e", "v1\x00",
]  # fmt: skip


@pytest.mark.parametrize("field", ["version", "name"])
def test_no_name_or_version_can_collide_with_store_files(live, store, tiny, field):
    """Defect 1: `version=index.json` replaced the name's index; every such identifier is now a 400."""
    before = store_hashes(store.root)
    manifest, tensors = bundle_files(tiny.spec, "keep", seed=5)
    for value in COLLIDING_VERSIONS:
        resp = upload(live.url, manifest, tensors, **{field: value})
        assert resp.status_code == 400, (value, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "bundle_name", (value, error)
        assert f"invalid bundle {field}" in error["message"] and str(store.root) not in error["message"]
    assert store_hashes(store.root) == before
    listing = httpx.get(live.url + "/v1/bundles", headers=OPS).json()
    assert [b["latest"] for b in listing["bundles"]] == ["keep@v1", "other@v1"]
    assert chat(live.url, "keep").json()["bundle"] == "keep@v1"


def test_reserved_words_are_named_as_such(live, tiny):
    resp = upload(live.url, *bundle_files(tiny.spec), version="index.json")
    assert "reserved for the store's own files" in resp.json()["error"]["message"]


def test_one_unreadable_name_breaks_neither_listing_nor_serving(live, store):
    """Defects 1 and 2: a corrupt index is reported for that name only, never with a path."""
    (store.root / "other" / "index.json").write_text("{ not json")
    before = store_hashes(store.root)
    listing = httpx.get(live.url + "/v1/bundles", headers=OPS)
    assert listing.status_code == 200
    body = listing.json()
    assert [b["latest"] for b in body["bundles"]] == ["keep@v1"]
    [broken] = body["unreadable"]
    assert broken["name"] == "other" and broken["error"]["type"] == "bundle_store"
    assert "index of bundle 'other' is unreadable" in broken["error"]["message"]
    models = httpx.get(live.url + "/v1/models", headers=CHAT)
    assert models.status_code == 200 and "keep@v1" in [m["id"] for m in models.json()["data"]]
    assert chat(live.url, "keep").json()["bundle"] == "keep@v1"
    resp = chat(live.url, "other")
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "bundle_store"
    for text in (listing.text, models.text, resp.text):
        assert str(store.root) not in text and "/tmp" not in text, text
    inspect = httpx.get(live.url + "/v1/bundles/other", headers=OPS)
    assert inspect.status_code == 500 and str(store.root) not in inspect.text
    assert "bundle 'other'" in inspect.json()["error"]["message"]
    assert store_hashes(store.root) == before
    gone = httpx.delete(live.url + "/v1/bundles/other", headers=OPS)  # the way out, without editing by hand
    assert gone.status_code == 200, gone.text
    assert "unreadable" not in httpx.get(live.url + "/v1/bundles", headers=OPS).json()


def test_store_errors_name_the_bundle_not_a_path(live, store):
    """Defect 2: a version whose files were tampered with is refused naming `name@version` only."""
    (store.root / "keep" / "v1" / "extra.bin").write_bytes(b"x")
    resp = httpx.get(live.url + "/v1/bundles/keep", headers=OPS)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "bundle_file_set"
    message = resp.json()["error"]["message"]
    assert "keep@v1 must hold exactly" in message and str(store.root) not in message, message


@pytest.mark.parametrize("path", ["/v1/chat", "/v1/chat/completions", "/v1/models"])
@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1,2"])
def test_auth_is_checked_before_the_body_is_parsed(live, path, body):
    """Defect 4: an unauthenticated malformed body got 400; it is 401 now."""
    method = "GET" if path == "/v1/models" else "POST"
    resp = httpx.request(
        method, live.url + path, content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["type"] == "unauthorized"
    assert "missing or wrong API key" in resp.json()["error"]["message"]
    assert resp.headers["www-authenticate"] == "Bearer"
    authed = httpx.post(
        live.url + "/v1/chat", content=b"{not json", headers={**CHAT, "content-type": "application/json"}
    )
    assert authed.status_code == 400 and "not valid JSON" in authed.json()["error"]["message"]


@pytest.mark.parametrize(
    "path", ["/v1/bundles/", "/v1/models/", "/v1/chat/", "/health/", "/v1/bundles/keep/"]
)
def test_no_redirect_points_at_the_client_host(live, path):
    """Defect 5: `GET /v1/bundles/` with `Host: evil.example` answered 307 to http://evil.example/..."""
    for method in ("GET", "POST"):
        resp = httpx.request(
            method, live.url + path, headers={**OPS, "Host": "evil.example"}, follow_redirects=False
        )
        assert resp.status_code in (404, 405), (method, path, resp.status_code, resp.headers)
        assert "location" not in resp.headers
        assert resp.json()["error"]["type"] in ("not_found", "method_not_allowed")
        assert "evil.example" not in resp.text


def _safetensors(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def test_duplicate_tensor_names_are_refused(live, store, tiny):
    """Defect 6: the last of two same-named tensors used to win silently."""
    manifest, good = bundle_files(tiny.spec, "keep", seed=3)
    n = int.from_bytes(good[:8], "little")
    header, data = good[8 : 8 + n].decode().rstrip(), good[8 + n :]
    first = next(iter(k for k in json.loads(header) if k != "__metadata__"))
    entry = json.dumps(json.loads(header)[first])
    duplicated = header[:-1] + f',"{first}":{entry}' + "}"
    before = store_hashes(store.root)
    resp = upload(live.url, manifest, _safetensors(duplicated.encode(), data))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "bundle_not_safetensors"
    assert f"header names {first!r} twice" in error["message"]
    assert store_hashes(store.root) == before


def test_a_huge_shape_is_refused_cheaply_with_a_short_message(live, store, tiny):
    """Defect 6: one shape of 100,000 dimensions cost seconds and echoed ~880 KB."""
    manifest, _ = bundle_files(tiny.spec, "keep")
    shape = [1] * 100_000
    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode()
    before = store_hashes(store.root)
    resp = upload(live.url, manifest, _safetensors(header, b"\0" * 4))
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "bundle_not_safetensors"
    assert "at most 8 dimensions" in resp.json()["error"]["message"]
    assert len(resp.content) < 2000
    long_name = "n" * 50_000
    header = json.dumps({long_name: {"dtype": "X", "shape": [1], "data_offsets": [0, 4]}}).encode()
    resp = upload(live.url, manifest, _safetensors(header, b"\0" * 4))
    assert resp.status_code == 400 and "unknown dtype" in resp.json()["error"]["message"]
    assert len(resp.content) < 2000
    assert store_hashes(store.root) == before


def test_every_api_error_body_is_bounded(live):
    """Defect 6: any message, whatever it quotes, is cut to 1000 characters (HTTP bodies and SSE errors)."""
    from server.api.errors import error_body, error_response

    assert len(error_body("x", "y" * 50_000)["error"]["message"]) == 1000
    body = json.loads(error_response(400, "x", "é" * 50_000).body)
    assert len(body["error"]["message"]) == 1000 and body["error"]["message"].endswith("(message truncated)")
    resp = chat(live.url, "x" * 5000)
    assert resp.status_code == 400 and len(resp.content) < 2000


def test_store_error_messages_are_bounded():
    from prompts_store.errors import BundleManifestError

    assert len(str(BundleManifestError("z" * 10**6))) == 1000


def test_shutdown_timeout_comes_from_the_flag_or_the_environment(monkeypatch):
    import argparse

    from pydantic import ValidationError

    from server.cli import add_serve_command, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    monkeypatch.setenv("M2PT_SHUTDOWN_TIMEOUT", "7.5")
    assert settings_from_args(parser.parse_args(["serve"])).shutdown_timeout_s == 7.5
    args = parser.parse_args(["serve", "--shutdown-timeout", "3"])
    assert settings_from_args(args).shutdown_timeout_s == 3.0  # a flag given wins
    monkeypatch.setenv("M2PT_SHUTDOWN_TIMEOUT", "soon")
    with pytest.raises(ValidationError):
        settings_from_args(parser.parse_args(["serve"]))
    monkeypatch.delenv("M2PT_SHUTDOWN_TIMEOUT")
    assert settings_from_args(parser.parse_args(["serve"])).shutdown_timeout_s == 30.0


def test_a_drain_answers_503_with_retry_after_and_ready_503(live):
    """The drain gate itself (the SIGTERM path is tested end to end in test_faults_shutdown.py)."""
    assert httpx.get(live.url + "/ready").status_code == 200
    live.app.state.drain.begin()
    ready = httpx.get(live.url + "/ready")
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "shutting_down"
    for method, path in (("POST", "/v1/chat"), ("GET", "/v1/models"), ("GET", "/v1/bundles")):
        resp = httpx.request(method, live.url + path, json={"instruction": "hi"}, headers={**CHAT, **OPS})
        assert resp.status_code == 503, (path, resp.text)
        assert resp.json()["error"]["type"] == "shutting_down" and int(resp.headers["retry-after"]) >= 1
    assert httpx.get(live.url + "/health").status_code == 200
    assert live.app.state.drain.in_flight == 0
