"""Against a REAL uvicorn server (fake engine): a client that disconnects — mid-stream, or while waiting for a
non-streamed answer — closes the engine iterator (its batch slot is freed), and is counted as status 499; body
caps hold on the wire for declared and chunked bodies; the server keeps serving afterwards."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from api_fakes import FakeEngine, LiveServer, wait_until

from server.app import create_app
from server.settings import Settings

LONG = " ".join(f"w{i}" for i in range(200))


@pytest.fixture(scope="module")
def live():
    engine = FakeEngine(delay_s=0.05)
    app = create_app(Settings(api_key=None, ops_token=None, max_body_bytes=32 * 1024), engine)
    with LiveServer(app) as server:
        yield server, engine


def raw_request(port: int, body: bytes, path: str = "/v1/chat", extra: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def requests_metric(url: str, status: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("m2pt_requests_total{") and f'status="{status}"' in line:
            return float(line.split()[-1])
    return 0.0


def test_disconnect_mid_stream_frees_the_slot(live):
    server, engine = live
    closed_before = len(engine.closed_early)
    with httpx.Client(timeout=10) as client:
        with client.stream(
            "POST", f"{server.url}/v1/chat", json={"instruction": LONG, "max_tokens": 100, "stream": True}
        ) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # keep a reference: a dropped httpx iterator closes the connection
            first = next(lines)
            assert json.loads(first[len("data: ") :])["text"] == "echo"
            request_id = engine.requests[-1].request_id
            assert request_id in engine.active
    # the response is closed after one event of 100: the engine iterator must be closed well before the end
    assert wait_until(lambda: request_id not in engine.active, timeout=3)
    assert request_id in engine.closed_early[closed_before:]
    assert wait_until(lambda: requests_metric(server.url, "499") >= 1)


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_the_slot(live):
    server, engine = live
    count = len(engine.requests)
    sock = raw_request(server.port, json.dumps({"instruction": LONG, "max_tokens": 100}).encode())
    assert wait_until(lambda: len(engine.requests) > count, timeout=3)
    request_id = engine.requests[-1].request_id
    assert wait_until(lambda: request_id in engine.active, timeout=3)
    sock.close()  # gone before the ~5 s answer is ready
    assert wait_until(lambda: request_id not in engine.active, timeout=3)
    assert request_id in engine.closed_early


def test_declared_oversize_body_is_413_without_reading_it(live):
    server, engine = live
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = (
        "POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1073741824\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"instruction": "')  # claims 1 GiB, sends a few bytes
    reply = b""
    while b"payload_too_large" not in reply:  # headers and body may arrive in separate segments
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413")
    assert '"type": "payload_too_large"' in reply or '"type":"payload_too_large"' in reply


def test_chunked_oversize_body_is_413_and_server_keeps_serving(live):
    server, engine = live

    def body():
        yield b'{"instruction": "hi", "image": "'
        for _ in range(64):
            yield b"A" * 1024
        yield b'"}'

    resp = httpx.post(
        f"{server.url}/v1/chat", content=body(), headers={"content-type": "application/json"}, timeout=10
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["message"] == (
        "request body is larger than the limit of 32768 bytes; send a smaller body"
    )
    ok = httpx.post(f"{server.url}/v1/chat", json={"instruction": "still alive", "max_tokens": 5}, timeout=10)
    assert ok.status_code == 200 and ok.json()["text"] == "echo still alive"
