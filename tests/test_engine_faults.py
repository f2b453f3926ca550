"""Failure isolation on the real engine and the tiny model, through a fault-injecting wrapper around the real
`LlavaOps`: a request whose prefill raises fails alone (finish reason "error", freed), the others produce exactly
what they produce without it; over HTTP a failed request is a 500 JSON error (or an SSE error event and
`[DONE]` once streaming), repeated faults turn `/ready` to 503 and show on `/metrics`."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from api_fakes import LiveServer

from server.engine.config import EngineConfig
from server.engine.factory import build_engine
from server.engine.model_ops import LlavaOps
from server.engine.types import GenerationRequest, SamplingParams


class FaultyOps(LlavaOps):
    """The real ops, except: a prefill chunk covering token `poison_id` raises; `fail_decodes` decode steps
    raise; a packed step raises when any of its parts would."""

    def __init__(self, model, device, poison_id: int) -> None:
        super().__init__(model, device)
        self.poison_id = poison_id
        self.fail_decodes = 0
        self.poison_position: int | None = None  # a decode step with a row at this position raises
        self.packed_steps = 0  # packed steps (chunks + decode rows in one forward) that ran
        self.packed_faults = 0

    def prefill_chunk(self, row, start, end, state):
        if bool((row.input_ids[start:end] == self.poison_id).any()):
            raise RuntimeError("injected prefill fault")
        return super().prefill_chunk(row, start, end, state)

    def packed_step(self, batch, tokens, chunks):
        """A packed step that covers a poisoned chunk or a failing decode raises too; the runner then rolls back
        and runs the parts one by one, where the faults above hit the right request."""
        poisoned = any(bool((c.row.input_ids[c.start : c.end] == self.poison_id).any()) for c in chunks)
        bad_row = batch is not None and self.poison_position is not None
        bad_row = bad_row and bool((batch.positions == self.poison_position).any())
        if poisoned or bad_row or (batch is not None and self.fail_decodes):
            self.packed_faults += 1
            raise RuntimeError("injected packed-step fault")
        self.packed_steps += 1
        return super().packed_step(batch, tokens, chunks)

    def decode_step(self, state, tokens):
        if self.fail_decodes:
            self.fail_decodes -= 1
            raise RuntimeError("injected decode fault")
        if self.poison_position is not None and bool((state.positions == self.poison_position).any()):
            raise RuntimeError("injected decode fault of one row")
        return super().decode_step(state, tokens)


def make_engine(tiny, **config):
    poison = tiny.processor.tokenizer.convert_tokens_to_ids("digit")
    ops = FaultyOps(tiny.model, tiny.device, poison)
    cfg = EngineConfig(**{"max_batch_size": 8, "max_num_batched_tokens": 24, **config})
    return build_engine(tiny, None, cfg, ops=ops, model_id="tiny"), ops


def request(rid: str, words: str, max_tokens: int = 10) -> GenerationRequest:
    messages = [{"role": "user", "content": [{"type": "text", "text": words}]}]
    return GenerationRequest(rid, messages, [], None, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def run_all(engine, requests):
    async def one(req):
        events = [e async for e in engine.generate(req)]
        return "".join(e.text for e in events), events[-1]

    await engine.start()
    try:
        results = await asyncio.gather(*(one(r) for r in requests))
        for _ in range(500):  # the loop frees finished rows at its next step
            if engine.runner.num_rows == 0 and engine.scheduler.num_running == 0:
                break
            await asyncio.sleep(0.01)
        return results, engine.runner.num_rows, engine.scheduler.num_running
    finally:
        await engine.stop()


GOOD = [("a", "what is this ?"), ("c", "is this what ?"), ("d", "what ? what is")]


def test_a_row_whose_prefill_raises_fails_alone(tiny):
    clean, clean_ops = make_engine(tiny)
    without, _, _ = asyncio.run(run_all(clean, [request(r, w) for r, w in GOOD]))
    assert clean_ops.packed_steps > 0 and clean_ops.packed_faults == 0, "the clean run must use packed steps"
    engine, ops = make_engine(tiny)
    # "digit" sits after the first chunk: the failing row has state in the runner when it fails
    bad = request("b", "what is this this this this this this this this this this this this this digit ?")
    mixed = [request(*GOOD[0]), bad, request(*GOOD[1]), request(*GOOD[2])]
    got, rows_left, running_left = asyncio.run(run_all(engine, mixed))
    text_b, final_b = got[1]
    assert final_b.finish_reason == "error" and "prefill" in final_b.error and text_b == ""
    assert [t for t, _ in got[:1] + got[2:]] == [t for t, _ in without]
    assert [f.completion_tokens for _, f in got[:1] + got[2:]] == [10, 10, 10]
    assert len({t for t, _ in without}) > 1
    assert rows_left == 0 and running_left == 0, "a finished or failed row was left in the runner"
    assert engine.stats()["recent_faults"] == 1
    assert ops.packed_faults >= 1, "the poisoned chunk must have been tried packed, then alone"


def test_a_row_whose_decode_raises_fails_alone(tiny):
    """A batched decode step raises because of one row: it is undone, the row is found by trying each alone,
    and the others continue exactly as without it."""
    clean, _ = make_engine(tiny)
    without, _, _ = asyncio.run(run_all(clean, [request(r, w) for r, w in GOOD]))
    engine, ops = make_engine(tiny)
    long_words = " ".join(["what is this ?"] * 8)  # longer than any other row can ever get
    bad = request("b", long_words)
    ops.poison_position = engine.preprocessor.prepare(bad, None).num_tokens + 3  # its 4th decode step
    mixed = [request(*GOOD[0]), bad, request(*GOOD[1]), request(*GOOD[2])]
    got, rows_left, running_left = asyncio.run(run_all(engine, mixed))
    text_b, final_b = got[1]
    assert final_b.finish_reason == "error" and "decode" in final_b.error
    assert final_b.completion_tokens == 4 and text_b  # what it streamed before the fault stands
    assert [t for t, _ in got[:1] + got[2:]] == [t for t, _ in without]
    assert [f.finish_reason for _, f in got[:1] + got[2:]] == ["length"] * 3
    assert rows_left == 0 and running_left == 0


# ---------------------------------------------------------------- over HTTP
@pytest.fixture()
def faulty_server(tiny):
    from pydantic import SecretStr

    from server.app import create_app
    from server.settings import Settings

    engine, ops = make_engine(tiny, fault_threshold=3)
    settings = Settings(api_key=None, ops_token=SecretStr("ops-token-for-tests"), max_tokens_limit=64)
    asyncio.run(engine.start())
    app = create_app(settings, engine)
    engine.metrics = app.state.metrics
    try:
        with LiveServer(app) as server:
            yield server, ops
    finally:
        asyncio.run(engine.stop())


def post_chat(url, instruction, **extra):
    body = {"instruction": instruction, "max_tokens": 6, "ignore_eos": True, **extra}
    return httpx.post(url + "/v1/chat", json=body, timeout=60)


def faults(url) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("m2pt_engine_faults_total"))


def test_failed_requests_are_5xx_and_repeated_faults_turn_ready_503(faulty_server):
    server, ops = faulty_server
    assert httpx.get(server.url + "/ready").status_code == 200
    resp = post_chat(server.url, "what is this digit ?")
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "engine_error" and "failed" in error["message"]
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        timeout=60,
        json={"model": "tiny", "messages": [{"role": "user", "content": "digit ?"}], "stream": True},
    ) as stream_resp:
        assert stream_resp.status_code == 500  # failed before the first token: still a JSON error
        assert json.loads(stream_resp.read())["error"]["type"] == "engine_error"
    assert faults(server.url) == 2 and httpx.get(server.url + "/ready").status_code == 200
    ops.fail_decodes = 1  # now fail after the first token: the stream is already a 200
    with httpx.stream(
        "POST",
        server.url + "/v1/chat",
        timeout=60,
        json={"instruction": "what is this ?", "max_tokens": 6, "ignore_eos": True, "stream": True},
    ) as stream_resp:
        assert stream_resp.status_code == 200
        lines = [line for line in stream_resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["error"]["type"] == "engine_error" and "decode" in last["error"]["message"]
    assert all(json.loads(line[6:]).get("finish_reason") != "error" for line in lines[:-2])
    assert faults(server.url) == 3
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"]
    assert post_chat(server.url, "what is this ?").status_code == 503  # refused while not ready
