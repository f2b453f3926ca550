"""Fault suite, graceful shutdown (issue 9): the real `m2pt serve` on the tiny model as a child process, 16
streaming requests in flight when SIGTERM arrives.

- a drain within `--shutdown-timeout`: `/ready` is 503 during it, new requests get 503 with `Retry-After`,
  every in-flight stream finishes normally, exit status 0, no traceback;
- a drain that runs past `--shutdown-timeout`: the cut streams end with finish_reason "abort" and `[DONE]`
  (on `/v1/chat` and on the OpenAI-compatible route alike);
- a forced quit (second SIGTERM): one log line, streams cut with "abort", exit 0, no traceback.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from fault_helpers import record_figure, start_streams

from bench.serve_proc import ServeProcess

pytestmark = pytest.mark.faults

N = 16


def _serve(tiny_model_dir, tmp_path, timeout_s: float) -> ServeProcess:
    flags = ["--max-batch-size", str(N), "--max-tokens-limit", "480", "--shutdown-timeout", str(timeout_s)]
    return ServeProcess(tiny_model_dir, tmp_path / "store", tmp_path / "serve.log", flags).start()


def _wait_first_chunks(records) -> None:
    for r in records:
        assert r.first.wait(60), "a stream never started"
    assert all(r.error is None and r.status == 200 for r in records), [(r.status, r.error) for r in records]


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_model_dir, tmp_path):
    server = _serve(tiny_model_dir, tmp_path, timeout_s=60)
    try:
        records, threads = start_streams(server.url, N, max_tokens=400)
        _wait_first_chunks(records)
        server.signal(signal.SIGTERM)
        sent = time.monotonic()
        deadline = time.monotonic() + 5
        while (ready := httpx.get(server.url + "/ready", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "/ready never turned 503"
            time.sleep(0.01)
        refused = httpx.post(server.url + "/v1/chat", json={"instruction": "hi"}, timeout=5)
        still_running = sum(r.finish_reason is None for r in records)
        for t in threads:
            t.join(60)
        code = server.wait(60)
        exit_s = time.monotonic() - sent
    finally:
        server.kill()
    output = server.output()
    record_figure(
        "shutdown_drain",
        in_flight_at_sigterm=N,
        still_running_when_503_seen=still_running,
        ready_status=ready.status_code,
        new_request_status=refused.status_code,
        retry_after=refused.headers.get("retry-after"),
        finish_reasons=sorted({str(r.finish_reason) for r in records}),
        finished_normally=sum(r.finish_reason == "length" and r.done for r in records),
        sigterm_to_exit_s=round(exit_s, 2),
        exit_code=code,
        traceback_in_log="Traceback" in output,
    )
    assert still_running > 0, "the drain was not observed while requests were in flight"
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "shutting_down"
    assert ready.headers["retry-after"]
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
    assert int(refused.headers["retry-after"]) >= 1 and "shutting down" in refused.json()["error"]["message"]
    assert [(r.finish_reason, r.tokens, r.done) for r in records] == [("length", 400, True)] * N
    assert code == 0, output
    assert f"draining {N} request(s) in flight" in output, output
    assert "Traceback" not in output and "Exception in" not in output, output


@pytest.mark.slow
def test_streams_past_the_shutdown_timeout_end_with_abort(tiny_model_dir, tmp_path):
    server = _serve(tiny_model_dir, tmp_path, timeout_s=0.3)
    try:
        records, threads = start_streams(server.url, N, max_tokens=460, openai_share=N // 2)
        _wait_first_chunks(records)
        server.signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = server.wait(60)
    finally:
        server.kill()
    output = server.output()
    reasons = [r.finish_reason for r in records]
    record_figure(
        "shutdown_timeout_cut",
        shutdown_timeout_s=0.3,
        aborted=reasons.count("abort"),
        finished=reasons.count("length"),
        all_got_done=all(r.done for r in records),
        exit_code=code,
        traceback_in_log="Traceback" in output,
    )
    assert all(r.done and r.error is None for r in records), [(r.done, r.error) for r in records]
    assert reasons.count("abort") >= 1 and set(reasons) <= {"abort", "length"}, reasons
    assert all(r.tokens < 460 for r in records if r.finish_reason == "abort")
    assert code == 0, output
    assert "shutdown timeout of 0.3 s passed: cutting" in output, output
    assert "Traceback" not in output and "Exception in" not in output, output


@pytest.mark.slow
def test_a_second_signal_forces_quit_with_one_log_line(tiny_model_dir, tmp_path):
    server = _serve(tiny_model_dir, tmp_path, timeout_s=600)
    try:
        records, threads = start_streams(server.url, N, max_tokens=460)
        _wait_first_chunks(records)
        server.signal(signal.SIGTERM)
        time.sleep(0.2)
        server.signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = server.wait(60)
    finally:
        server.kill()
    output = server.output()
    record_figure(
        "shutdown_forced_quit",
        aborted=sum(r.finish_reason == "abort" for r in records),
        all_got_done=all(r.done for r in records),
        forced_quit_log_lines=output.count("forced quit"),
        exit_code=code,
        traceback_in_log="Traceback" in output,
    )
    assert code == 0, output
    assert output.count("forced quit") == 1, output
    assert "Traceback" not in output and "Exception in" not in output, output
    assert all(r.done and r.finish_reason in ("abort", "length") for r in records), records
    assert any(r.finish_reason == "abort" for r in records)
