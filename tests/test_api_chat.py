"""POST /v1/chat against the fake engine: answers, SSE streaming, every bad input of issue 3 (status AND
message, and the next request still works), unknown bundles, overload, readiness and request metrics."""

from __future__ import annotations

import base64
import json

import pytest
from api_fakes import FakeEngine, png_b64, png_bytes
from fastapi.testclient import TestClient
from test_api_images import png_with_header

from server.app import create_app
from server.settings import Settings


def make_client(engine=None, **settings):
    values = {
        "api_key": None,
        "ops_token": None,
        "max_body_bytes": 64 * 1024,
        "max_instruction_chars": 200,
        "max_tokens_limit": 100,
        **settings,
    }
    app = create_app(Settings(**values), engine if engine is not None else FakeEngine())
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    with make_client(engine) as c:
        yield c


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events), events
    return [block[len("data: ") :] for block in events]


def good(client) -> None:
    """The server keeps serving after a bad request."""
    resp = client.post("/v1/chat", json={"instruction": "what color is it?", "image": png_b64()})
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == "echo what color is it? image 16x16"


def test_answer_shape(client, engine):
    resp = client.post(
        "/v1/chat",
        json={
            "instruction": "what color?",
            "image": png_b64((20, 12)),
            "bundle": "colors",
            "max_tokens": 10,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": ["."],
            "ignore_eos": True,
        },
    )
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"id", "bundle", "text", "finish_reason", "usage"}
    assert body["bundle"] == "colors@v1" and body["text"] == "echo what color? image 20x12"
    assert body["finish_reason"] == "stop" and body["usage"] == {"prompt_tokens": 7, "completion_tokens": 4}
    seen = engine.requests[-1]
    assert seen.bundle == "colors" and seen.sampling.max_tokens == 10 and seen.sampling.seed == 3
    assert seen.sampling.temperature == 0.5 and seen.sampling.top_p == 0.9 and seen.sampling.stop == (".",)
    assert seen.sampling.ignore_eos is True
    assert seen.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}
    ]
    assert seen.images[0].mode == "RGB" and seen.timeout_s == 120.0


def test_defaults_greedy_and_default_max_tokens(client, engine):
    resp = client.post("/v1/chat", json={"instruction": "one two three four five", "max_tokens": 3})
    assert resp.json()["finish_reason"] == "length" and resp.json()["text"] == "echo one two"
    client.post("/v1/chat", json={"instruction": "hi"})
    sampling = engine.requests[-1].sampling
    assert sampling.temperature == 0.0 and sampling.top_p == 1.0 and sampling.max_tokens == 64
    assert sampling.ignore_eos is False


def test_streaming_is_sse_ending_with_done_and_matches_non_streaming(client):
    payload = {"instruction": "what shape is this?", "image": png_b64(), "bundle": "colors"}
    plain = client.post("/v1/chat", json=payload).json()
    resp = client.post("/v1/chat", json={**payload, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert all(c["finish_reason"] is None for c in chunks[:-1]) and chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == plain["usage"] and {c["bundle"] for c in chunks} == {"colors@v1"}


def test_engine_failure_mid_stream_is_reported_in_band(engine, client):
    engine.fail_after = 2
    resp = client.post("/v1/chat", json={"instruction": "a b c d", "stream": True})
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {
        "error": {"type": "engine_error", "message": "the fake engine failed mid-stream"}
    }
    engine.fail_after = None
    good(client)


TRUNCATED = base64.b64encode(png_bytes((64, 64), (10, 200, 30))[:60]).decode()
BOMB = base64.b64encode(png_with_header(5000, 5000, b"garbage")).decode()


@pytest.mark.parametrize(
    "payload, status, error_type, fragment",
    [
        ({"image": "this is not base64!"}, 400, "invalid_image", "not valid base64"),
        ({"image": base64.b64encode(b"plain text, not pixels").decode()}, 400, "invalid_image", "not a PNG"),
        ({"image": TRUNCATED}, 400, "invalid_image", "truncated or corrupt"),
        ({"image": BOMB}, 413, "image_too_large", "5000x5000 pixels, over the limit"),
        ({"image": "https://example.com/cat.png"}, 400, "remote_image_refused", "allow_remote_images is off"),
        (
            {"image": "http://169.254.169.254/latest"},
            400,
            "remote_image_refused",
            "allow_remote_images is off",
        ),
        ({"instruction": ""}, 400, "invalid_request", "instruction is empty"),
        ({"instruction": "   \n "}, 400, "invalid_request", "instruction is empty"),
        ({"instruction": "x" * 201}, 400, "invalid_request", "201 characters, over the limit of 200"),
        ({"max_tokens": 0}, 400, "invalid_request", "max_tokens: Input should be greater than or equal to 1"),
        (
            {"max_tokens": -1},
            400,
            "invalid_request",
            "max_tokens: Input should be greater than or equal to 1",
        ),
        ({"max_tokens": 101}, 400, "invalid_request", "max_tokens 101 is over this server's limit of 100"),
        ({"max_tokens": 2**40}, 400, "invalid_request", "max_tokens: Input should be less than or equal to"),
        ({"max_tokens": "5"}, 400, "invalid_request", "max_tokens: Input should be a valid integer"),
        (
            {"temperature": 2.5},
            400,
            "invalid_request",
            "temperature: Input should be less than or equal to 2",
        ),
        ({"top_p": 0}, 400, "invalid_request", "top_p: Input should be greater than 0"),
        ({"stop": ["a"] * 9}, 400, "invalid_request", "9 stop strings, over the limit of 8"),
        ({"color": "red"}, 400, "invalid_request", "color: unknown field"),
        ({"chat_template_kwargs": {}}, 400, "invalid_request", "chat_template_kwargs: unknown field"),
        ({"bundle": "../etc"}, 404, "bundle_not_found", "no bundle named '../etc'"),
    ],
)
def test_bad_inputs(client, engine, payload, status, error_type, fragment):
    before = len(engine.requests)
    resp = client.post("/v1/chat", json={"instruction": "what is it?", **payload})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == error_type and fragment in error["message"], error
    assert len(engine.requests) == before  # nothing reached the engine
    good(client)


def test_nan_temperature_and_non_json_body(client):
    resp = client.post(
        "/v1/chat",
        content=b'{"instruction": "hi", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert (
        resp.status_code == 400
        and "temperature: Input should be a finite number" in resp.json()["error"]["message"]
    )
    resp = client.post("/v1/chat", content=b'{"instruction": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    good(client)


@pytest.mark.parametrize(
    "body, content_type, fragment",
    [
        (b'{"instruction": "\\ud800 hi"}', "application/json", "instruction contains invalid Unicode"),
        (b'{"instruction": "hi", "stop": ["\\udfff"]}', "application/json", "a stop string contains invalid"),
        (b'{"instruction": "hi"}', None, "request body must be a JSON object sent with Content-Type"),
        (b'{"instruction": "hi"}', "text/plain", "request body must be a JSON object sent with Content-Type"),
        (b"[1, 2]", "application/json", "request body must be a JSON object"),
        (b"", "application/json", "request body is missing"),
        (
            b'{"instruction": "hi", "stop": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
            "application/json",
            "error parsing the body",
        ),
        (b'{"instruction": "hi", "max_tokens": 1e309}', "application/json", "max_tokens: Input should be"),
    ],
)
def test_malformed_bodies_are_400_never_500(client, body, content_type, fragment):
    headers = {"content-type": content_type} if content_type else {}
    resp = client.post("/v1/chat", content=body, headers=headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request" and fragment in resp.json()["error"]["message"]
    good(client)


def test_oversize_body_is_413_before_parsing(client):
    big = {"instruction": "hi", "image": "A" * (70 * 1024)}
    resp = client.post("/v1/chat", json=big)
    assert resp.status_code == 413
    assert resp.json()["error"] == {
        "type": "payload_too_large",
        "message": "request body is larger than the limit of 65536 bytes; send a smaller body",
    }
    good(client)


def test_oversize_chunked_body_is_413_while_streaming_in(client):
    def chunks():
        yield b'{"instruction": "hi", "image": "'
        for _ in range(100):
            yield b"A" * 1024
        yield b'"}'

    resp = client.post("/v1/chat", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "payload_too_large"
    good(client)


def test_unknown_bundle_is_404_never_the_base_model(client, engine):
    resp = client.post("/v1/chat", json={"instruction": "hi", "bundle": "nope"})
    assert resp.status_code == 404
    assert resp.json()["error"] == {"type": "bundle_not_found", "message": "no bundle named 'nope'"}
    resp = client.post("/v1/chat", json={"instruction": "hi", "bundle": "nope", "stream": True})
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "bundle_not_found"
    assert engine.requests == []


def test_full_queue_is_429_with_retry_after(client, engine):
    engine.queue_full = True
    resp = client.post("/v1/chat", json={"instruction": "hi"})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
    assert resp.json()["error"]["type"] == "queue_full" and "retry later" in resp.json()["error"]["message"]
    engine.queue_full = False
    good(client)


def test_before_the_engine_exists_chat_and_ready_are_503_health_is_200():
    # no lifespan run (no `with`) and no injected engine: the state of a server still loading its model
    app = create_app(Settings(api_key=None, ops_token=None))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/health").json() == {"status": "ok"}
    for resp in (client.get("/ready"), client.post("/v1/chat", json={"instruction": "hi"})):
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "not_ready"


def test_ready_follows_the_engine(client, engine):
    assert client.get("/ready").json() == {"status": "ready", "model": "fake-base"}
    engine.is_ready = False
    assert client.get("/ready").status_code == 503


def test_unknown_route_and_wrong_method_use_the_error_shape(client):
    resp = client.get("/v1/nothing")
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found"
    resp = client.get("/v1/chat")
    assert resp.status_code == 405 and resp.json()["error"]["type"] == "method_not_allowed"


def metric(client, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


def test_request_metrics_by_bundle_and_status(client, engine):
    client.post("/v1/chat", json={"instruction": "hi", "bundle": "colors"})
    client.post("/v1/chat", json={"instruction": "hi", "bundle": "colors", "stream": True})
    client.post("/v1/chat", json={"instruction": "hi"})
    client.post("/v1/chat", json={"instruction": "hi", "bundle": "nope"})
    client.post("/v1/chat", json={"instruction": ""})
    engine.queue_full = True
    client.post("/v1/chat", json={"instruction": "hi"})
    assert metric(client, "m2pt_requests_total", bundle="colors@v1", status="200") == 2
    assert metric(client, "m2pt_requests_total", bundle="none", status="200") == 1
    assert metric(client, "m2pt_requests_total", bundle="unknown", status="404") == 1
    assert metric(client, "m2pt_requests_total", bundle="unknown", status="400") == 1
    assert metric(client, "m2pt_requests_total", bundle="unknown", status="429") == 1
    assert 'bundle="nope"' not in client.get("/metrics").text  # client-chosen names never become labels
