"""Ops API over a REAL bundle store and the tiny model's spec: upload, list, inspect, versions, delete (and
what chat then sees), and every bad upload of issue 4 — each a 4xx with a message, with nothing written to the
store."""

from __future__ import annotations

import dataclasses
import json
import pickle
import threading
from pathlib import Path

import httpx
import pytest
import torch
from api_fakes import FakeEngine, LiveServer
from fastapi.testclient import TestClient
from safetensors.torch import save

from m2pt.prompts import init_prompts
from prompts_store.format import encode_bundle
from prompts_store.store import BundleStore
from server.app import create_app
from server.settings import Settings

TOKEN = "ops-token-abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def store(tmp_path):
    return BundleStore(tmp_path / "store")


@pytest.fixture
def client(store, tiny):
    engine = FakeEngine(store=store)
    app = create_app(
        Settings(api_key=None, ops_token=TOKEN, store=store.root, max_bundle_bytes=16 * 1024),
        engine,
        store=store,
        spec=tiny.spec,
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def bundle_files(spec, name="colors", seed=0, text_len=4, visual_len=2, prompts=None) -> tuple[bytes, bytes]:
    prompts = prompts or init_prompts(spec, text_len, visual_len, seed=seed)
    return encode_bundle(
        prompts, spec, name, None, {"dataset": "synthetic-colors", "metrics": {"accuracy": 0.9}}
    )


def upload(client, manifest: bytes, tensors: bytes, headers=AUTH, **fields):
    files = {
        "manifest": ("manifest.json", manifest, "application/json"),
        "tensors": ("tensors.safetensors", tensors, "application/octet-stream"),
    }
    return client.post("/v1/bundles", files=files, data=fields, headers=headers)


def store_snapshot(store: BundleStore) -> list[str]:
    """Every file and directory under the store root except lock files (what a bad upload must not change)."""
    return sorted(
        str(p.relative_to(store.root)) for p in Path(store.root).rglob("*") if ".locks" not in p.parts
    )


def test_upload_list_inspect_chat_new_version_delete(client, store, tiny):
    manifest, tensors = bundle_files(tiny.spec)
    resp = upload(client, manifest, tensors)
    assert resp.status_code == 201, resp.text
    first = resp.json()
    assert first["bundle"] == "colors@v1" and first["content_hash"].startswith("sha256:")

    chat = client.post("/v1/chat", json={"instruction": "what color?", "bundle": "colors"})
    assert chat.status_code == 200 and chat.json()["bundle"] == "colors@v1"

    second = upload(client, *bundle_files(tiny.spec, seed=1)).json()
    assert second["bundle"] == "colors@v2" and second["content_hash"] != first["content_hash"]
    assert (
        client.post("/v1/chat", json={"instruction": "hi", "bundle": "colors"}).json()["bundle"]
        == "colors@v2"
    )
    assert (
        client.post("/v1/chat", json={"instruction": "hi", "bundle": "colors@v1"}).json()["bundle"]
        == "colors@v1"
    )

    listing = client.get("/v1/bundles", headers=AUTH).json()["bundles"]
    assert listing == [
        {
            "name": "colors",
            "versions": ["v1", "v2"],
            "latest": "colors@v2",
            "content_hash": second["content_hash"],
        }
    ]
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models == ["fake-base", "colors", "colors@v1", "colors@v2"]

    detail = client.get("/v1/bundles/colors", headers=AUTH).json()
    assert detail["name"] == "colors" and [v["version"] for v in detail["versions"]] == ["v1", "v2"]
    v1 = detail["versions"][0]
    assert v1["shapes"] == {
        "text_prompts": [tiny.spec.llm_layers, 4, tiny.spec.llm_dim],
        "visual_prompts": [tiny.spec.vit_layers, 2, tiny.spec.vit_dim],
    }
    assert v1["size_bytes"] > len(tensors) and v1["created_at"] and v1["published_at"]
    assert v1["provenance"]["dataset"] == "synthetic-colors" and v1["metrics"] == {"accuracy": 0.9}
    assert v1["serving"]["requests"] == {"200": 2}
    one = client.get("/v1/bundles/colors@v2", headers=AUTH).json()
    assert [v["label"] for v in one["versions"]] == ["colors@v2"] and one["versions"][0]["latest"]

    assert client.delete("/v1/bundles/colors/v1", headers=AUTH).json() == {"deleted": ["colors@v1"]}
    gone = client.post("/v1/chat", json={"instruction": "hi", "bundle": "colors@v1"})
    assert gone.status_code == 404 and "has no version 'v1'" in gone.json()["error"]["message"]
    upload(client, *bundle_files(tiny.spec, seed=2))  # v3
    assert client.delete("/v1/bundles/colors@v3", headers=AUTH).json() == {"deleted": ["colors@v3"]}
    assert client.delete("/v1/bundles/colors", headers=AUTH).json() == {"deleted": ["colors@v2"]}
    assert client.post("/v1/chat", json={"instruction": "hi", "bundle": "colors"}).status_code == 404
    assert client.get("/v1/bundles", headers=AUTH).json() == {"bundles": []}
    assert client.delete("/v1/bundles/colors", headers=AUTH).status_code == 404


def test_upload_with_name_and_version_fields(client, tiny):
    resp = upload(client, *bundle_files(tiny.spec), name="shapes", version="2024-a")
    assert resp.status_code == 201 and resp.json()["bundle"] == "shapes@2024-a"
    again = upload(client, *bundle_files(tiny.spec), name="shapes", version="2024-a")
    assert again.status_code == 409 and again.json()["error"]["type"] == "bundle_conflict"


class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _float64_tensors(spec) -> bytes:
    prompts = init_prompts(spec, 4, 2)
    return save({"text_prompts": prompts.text.double(), "visual_prompts": prompts.visual.double()})


def _bad_cases(spec, tmp_path):
    manifest, tensors = bundle_files(spec)
    nan = init_prompts(spec, 4, 2)
    nan.text[0, 0, 0] = float("nan")
    wrong = init_prompts(spec, 4, 2)
    wrong.text = torch.zeros(spec.llm_layers, 4, spec.llm_dim + 1)
    other = dataclasses.replace(spec, vocab_size=spec.vocab_size + 1)
    canary = tmp_path / "pwned"
    return {
        "manifest not JSON": ((b"{not json", tensors), 400, "bundle_manifest", "JSON"),
        "manifest huge": (
            (b" " * (64 * 1024 + 1) + manifest, tensors),
            413,
            "payload_too_large",
            "'manifest' is",
        ),
        "tensors a pickle": (
            (manifest, pickle.dumps(_Canary(str(canary)))),
            400,
            "bundle_not_safetensors",
            "",
        ),
        "tensors garbage": ((manifest, b"\x00" * 100), 400, "bundle_not_safetensors", ""),
        "wrong shape": (bundle_files(spec, prompts=wrong), 422, "bundle_shape", "text_prompts"),
        "float64": ((manifest, _float64_tensors(spec)), 422, "bundle_dtype", ""),
        "NaN": (bundle_files(spec, prompts=nan), 422, "bundle_non_finite", ""),
        "other base model": (bundle_files(other, text_len=4), 422, "bundle_fingerprint", ""),
        "over size cap": (
            bundle_files(spec, text_len=64),
            413,
            "payload_too_large",
            "over the limit of 16384",
        ),
        "empty tensors": ((manifest, b""), 400, "invalid_upload", "'tensors' is empty"),
    }, canary


def test_bad_uploads_are_4xx_with_a_message_and_write_nothing(client, store, tiny, tmp_path):
    upload(client, *bundle_files(tiny.spec, name="keep"))
    cases, canary = _bad_cases(tiny.spec, tmp_path)
    before = store_snapshot(store)
    for label, ((manifest, tensors), status, error_type, fragment) in cases.items():
        resp = upload(client, manifest, tensors)
        assert resp.status_code == status, (label, resp.text)
        error = resp.json()["error"]
        assert error["type"] == error_type and fragment in error["message"] and len(error["message"]) > 20, (
            label
        )
        assert store_snapshot(store) == before, label
    assert not canary.exists()  # the pickle was never unpickled
    assert client.post("/v1/chat", json={"instruction": "hi", "bundle": "keep"}).json()["bundle"] == "keep@v1"


@pytest.mark.parametrize("name", ["../x", "a/b", "A", ".hidden", "x" * 300, "a b", "é"])
def test_odd_names_are_refused(client, store, tiny, name):
    before = store_snapshot(store)
    resp = upload(client, *bundle_files(tiny.spec), name=name)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "bundle_name"
    assert "invalid bundle name" in resp.json()["error"]["message"]
    assert store_snapshot(store) == before
    for path in (f"/v1/bundles/{name}", "/v1/bundles/..%2Fx", "/v1/bundles/%2e%2e"):
        resp = client.get(path, headers=AUTH)
        assert resp.status_code in (400, 404, 405), (path, resp.status_code)


def test_delete_refuses_an_empty_version(client, tiny):
    upload(client, *bundle_files(tiny.spec))
    resp = client.delete("/v1/bundles/colors@", headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "bundle_name"
    assert client.get("/v1/bundles", headers=AUTH).json()["bundles"][0]["versions"] == ["v1"]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"json": {"manifest": "x"}}, "wrong content type"),
        ({"files": {"manifest": ("m.json", b"{}")}}, "file part 'tensors' is missing"),
        (
            {"files": {"manifest": ("m", b"{}"), "tensors": ("t", b"x"), "extra": ("e", b"x")}},
            "Too many files",
        ),
        ({"files": {"tensors": ("t", b"x")}, "data": {"manifest": "{}"}}, "file part 'manifest' is missing"),
    ],
)
def test_malformed_multipart_is_400(client, store, kwargs, fragment):
    before = store_snapshot(store)
    resp = client.post("/v1/bundles", headers=AUTH, **kwargs)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_upload"
    assert fragment in resp.json()["error"]["message"]
    assert store_snapshot(store) == before


def test_upload_body_over_the_cap_is_413_before_parsing(client, store, tiny):
    manifest, _ = bundle_files(tiny.spec)
    before = store_snapshot(store)
    resp = upload(
        client, manifest, b"\0" * (16 * 1024 + 200 * 1024)
    )  # over max_bundle_bytes + manifest + framing
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "payload_too_large"
    assert "request body is larger than the limit of" in resp.json()["error"]["message"]
    assert store_snapshot(store) == before


def test_uploads_without_the_token_write_nothing(client, store, tiny):
    before = store_snapshot(store)
    for headers in ({}, {"Authorization": "Bearer wrong-token-1"}):
        assert upload(client, *bundle_files(tiny.spec), headers=headers).status_code == 401
    assert store_snapshot(store) == before


def test_twenty_concurrent_uploads_over_http_get_distinct_versions(store, tiny):
    engine = FakeEngine(store=store)
    app = create_app(
        Settings(api_key=None, ops_token=TOKEN, store=store.root), engine, store=store, spec=tiny.spec
    )
    payloads = [bundle_files(tiny.spec, seed=i) for i in range(20)]
    results: list[dict] = []
    with LiveServer(app) as server:

        def push(files):
            resp = httpx.post(
                f"{server.url}/v1/bundles",
                headers=AUTH,
                timeout=60,
                files={"manifest": ("manifest.json", files[0]), "tensors": ("t.safetensors", files[1])},
            )
            results.append(resp.json() | {"status": resp.status_code})

        threads = [threading.Thread(target=push, args=(p,)) for p in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [r["status"] for r in results] == [201] * 20
    assert sorted(r["version"] for r in results) == sorted(f"v{i}" for i in range(1, 21))
    hashes = {json.loads(m)["content_hash"] for m, _ in payloads}
    assert {r["content_hash"] for r in results} == hashes  # every upload landed intact, none lost or mixed
    for r in results:
        assert store.load(r["bundle"], tiny.spec).content_hash == r["content_hash"]


def test_prompt_token_limits_come_from_the_settings(store, tiny):
    """`--max-text-tokens` / `--max-visual-tokens` bound uploads; the 422 names the flag to raise."""
    settings = Settings(
        api_key=None, ops_token=TOKEN, store=store.root, max_text_tokens=3, max_visual_tokens=2
    )
    app = create_app(settings, FakeEngine(store=store), store=store, spec=tiny.spec)
    before = store_snapshot(store)
    with TestClient(app, raise_server_exceptions=False) as c:
        refused = upload(c, *bundle_files(tiny.spec, text_len=4, visual_len=2))
        assert refused.status_code == 422 and refused.json()["error"]["type"] == "bundle_token_limit"
        message = refused.json()["error"]["message"]
        assert "4 text prompt tokens" in message and "at most 3" in message and "--max-text-tokens" in message
        assert store_snapshot(store) == before
        assert upload(c, *bundle_files(tiny.spec, text_len=3, visual_len=2)).status_code == 201


def test_ops_routes_answer_503_until_the_store_is_open(tiny):
    """The ops routes use the app's store, not the engine's: without one (still starting) they answer 503."""
    app = create_app(Settings(api_key=None, ops_token=TOKEN), FakeEngine())
    with TestClient(app, raise_server_exceptions=False) as c:
        for resp in (c.get("/v1/bundles", headers=AUTH), upload(c, *bundle_files(tiny.spec))):
            assert resp.status_code == 503 and resp.json()["error"]["type"] == "not_ready"
            assert "still starting" in resp.json()["error"]["message"]
