"""The engine core without a model (no torch): the real `Scheduler`, `OutputProcessor` and `Engine.step()` over a
scripted runner. Every way a request ends (EOS, length, stop string, deadline, abort, a failing row, an
engine-level fault), the token budget, fairness, and that nothing is stranded or busy-waits."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
from engine_fakes import EOS, Core, make_request

from server.engine.config import EngineConfig
from server.engine.errors import QueueFullError
from server.engine.scheduler import chunk_end
from server.engine.types import GenerationRequest, SamplingParams


def test_eos_ends_with_stop_and_is_not_in_the_text():
    core = Core(scripts={"a": [5, 6, EOS, 8]})
    sink = core.add("a")
    core.run()
    assert sink.text == "<5><6>"
    assert sink.final.finish_reason == "stop" and sink.final.completion_tokens == 2
    assert sink.final.prompt_tokens == 4
    assert core.runner.rows == {} and core.scheduler.num_running == 0


def test_ignore_eos_runs_to_max_tokens():
    core = Core(scripts={"a": [5, EOS, 6]})
    sink = core.add("a", max_tokens=3, ignore_eos=True)
    core.run()
    assert sink.final.finish_reason == "length" and sink.final.completion_tokens == 3


def test_max_tokens_ends_with_length():
    core = Core(scripts={"a": [3, 4, 5, 6, 7]})
    sink = core.add("a", max_tokens=3)
    core.run()
    assert sink.text == "<3><4><5>" and sink.final.finish_reason == "length"
    decodes = sum(out.decode.count("a") for out in core.runner.calls)
    assert decodes == 2  # the first token comes from the prefill; no token is computed past max_tokens


def test_stop_string_cuts_the_text_and_frees_the_row_at_once():
    core = Core(scripts={"a": [5, 7, 8, 8, 8]})
    sink = core.add("a", stop=("<7>",), max_tokens=50)
    core.run()
    assert sink.text == "<5>" and sink.final.finish_reason == "stop"
    assert sink.final.completion_tokens == 2
    assert sum(out.decode.count("a") for out in core.runner.calls) == 1


def test_stop_string_across_tokens_is_held_back_until_decided():
    core = Core(scripts={"a": [1, 4, 5, 6]})
    sink = core.add("a", stop=("<4><5>",), max_tokens=50)
    core.run()
    assert sink.text == "<1>" and sink.final.finish_reason == "stop"


def test_deadline_finishes_waiting_and_running_requests_with_timeout():
    core = Core(EngineConfig(max_batch_size=1, max_num_batched_tokens=64))
    running = core.add("run", max_tokens=100, deadline=1005.0)
    waiting = core.add("wait", max_tokens=100, deadline=1003.0)
    core.run(max_steps=3)
    assert core.scheduler.num_running == 1 and core.scheduler.num_waiting == 1
    core.clock.now = 1004.0
    core.run(max_steps=1)
    assert waiting.final.finish_reason == "timeout" and waiting.final.completion_tokens == 0
    assert running.final is None
    core.clock.now = 1006.0
    core.run()
    assert running.final.finish_reason == "timeout" and running.final.completion_tokens >= 3
    assert core.runner.rows == {}, "the timed-out row must be freed in the runner"
    assert all("wait" not in [r.request_id for r in out.new] for out in core.runner.calls)


def test_abort_of_a_waiting_and_of_a_running_request():
    core = Core(EngineConfig(max_batch_size=1, max_num_batched_tokens=64))
    running = core.add("run", max_tokens=100)
    waiting = core.add("wait", max_tokens=100)
    core.run(max_steps=2)
    core.engine.abort("wait")
    core.engine.abort("run")
    core.engine.abort("never-heard-of")
    core.run()
    assert waiting.final.finish_reason == "abort" and running.final.finish_reason == "abort"
    assert core.runner.rows == {} and core.scheduler.num_waiting == 0 and core.scheduler.num_running == 0


def run_three(fail: set[str]):
    core = Core(
        EngineConfig(max_batch_size=4, max_num_batched_tokens=16),
        scripts={"a": [10, 11, 12, EOS], "b": [20, 21, EOS], "c": [30, 31, 32, 33, EOS]},
    )
    core.runner.fail_prefill = fail
    sinks = {rid: core.add(rid, prompt_len=6) for rid in "abc"}
    core.run()
    return core, sinks


def test_a_failing_row_fails_alone_and_the_others_are_unchanged():
    alone_core, alone = run_three(fail=set())
    core, sinks = run_three(fail={"b"})
    assert sinks["b"].final.finish_reason == "error"
    assert "failed" in sinks["b"].final.error and sinks["b"].text == ""
    for rid in "ac":
        assert sinks[rid].text == alone[rid].text and sinks[rid].final.finish_reason == "stop"
    assert core.runner.rows == {} and core.scheduler.num_running == 0
    assert core.engine.recent_faults() == 1 and alone_core.engine.recent_faults() == 0


def test_engine_level_fault_fails_admitted_requests_keeps_waiting_ones_and_counts():
    core = Core(EngineConfig(max_batch_size=1, max_num_batched_tokens=64, fault_threshold=2))
    first = core.add("first", max_tokens=100)
    second = core.add("second", max_tokens=2)
    core.run(max_steps=2)
    core.runner.raise_step = True
    core.run(max_steps=1)
    assert first.final.finish_reason == "error" and core.runner.resets == 1
    assert second.final is None  # still waiting, then served normally
    core.run()
    assert second.final.finish_reason == "length"
    assert core.engine.recent_faults() == 1


def test_repeated_faults_make_the_engine_not_ready_until_the_window_passes():
    core = Core(
        EngineConfig(max_batch_size=2, max_num_batched_tokens=64, fault_threshold=2, fault_window_s=60)
    )
    core.engine._thread = threading.current_thread()  # "running", for `ready`
    assert core.engine.ready
    for rid in ("x", "y"):
        core.runner.fail_prefill.add(rid)
        core.add(rid)
        core.run()
    assert not core.engine.ready and core.engine.stats()["recent_faults"] == 2
    core.clock.now += 61
    assert core.engine.ready


def test_every_running_row_decodes_every_step_and_the_budget_holds():
    config = EngineConfig(max_batch_size=4, max_num_batched_tokens=8)
    core = Core(config)
    core.add("d1", prompt_len=3, max_tokens=40, ignore_eos=True)
    core.add("d2", prompt_len=3, max_tokens=40, ignore_eos=True)
    core.run(max_steps=2)
    long = core.add("long", prompt_len=30, max_tokens=2)
    core.run(until=lambda: long.final is not None)
    steps = core.runner.calls[2:]
    prefill_steps = [out for out in steps if out.chunks]
    assert len(prefill_steps) >= 30 // (8 - 2)  # the long prompt is spread over several steps
    for out in steps:
        assert out.num_scheduled_tokens <= 8
        if out.chunks:
            assert set(out.decode) >= {"d1", "d2"}, "running rows must decode while a prompt is prefilled"


def test_prompts_are_served_in_arrival_order():
    core = Core(EngineConfig(max_batch_size=4, max_num_batched_tokens=5))
    core.add("first", prompt_len=12, max_tokens=1)
    core.add("second", prompt_len=12, max_tokens=1)
    core.run()
    order = [c.request_id for out in core.runner.calls for c in out.chunks]
    first_done = max(i for i, rid in enumerate(order) if rid == "first")
    second_start = min(i for i, rid in enumerate(order) if rid == "second")
    assert first_done <= second_start + 1  # second only gets what first leaves of a step


def test_image_encode_is_budgeted_and_never_blocks():
    core = Core(EngineConfig(max_batch_size=4, max_num_batched_tokens=4))
    core.add("a", max_tokens=30, ignore_eos=True)
    core.run(max_steps=2)
    img = core.add("img", prompt_len=12, image_tokens=10, max_tokens=1)
    core.run(until=lambda: img.final is not None)
    encodes = [out for out in core.runner.calls if "img" in out.encode]
    assert len(encodes) == 1 and not [c for c in encodes[0].chunks if c.request_id == "img"]
    assert img.final.finish_reason == "length"


def test_an_image_encode_costs_its_calibrated_cost_not_its_placeholders():
    """A 10-placeholder image whose encode costs 3 budget tokens shares its step with the prompt's first chunk."""
    core = Core(EngineConfig(max_batch_size=4, max_num_batched_tokens=8))
    core.add("a", max_tokens=30, ignore_eos=True)
    core.run(max_steps=2)
    request, sink = make_request("img", 12, image_tokens=10, max_tokens=1)
    request.row.encode_cost = 3
    core.outputs.start(request)
    core.scheduler.add(request)
    core.run(until=lambda: sink.final is not None)
    (step,) = [out for out in core.runner.calls if "img" in out.encode]
    assert [(c.start, c.end) for c in step.chunks if c.request_id == "img"] == [(0, 8 - 1 - 3)]
    assert step.num_scheduled_tokens == 8


def test_chunk_end_never_cuts_a_span():
    spans = [(3, 9), (12, 14)]
    assert chunk_end(0, 5, spans) == 3  # stop before the span: other tokens come first
    assert chunk_end(3, 5, spans) == 9  # the span starts the chunk: take it whole, over the budget
    assert chunk_end(9, 13, spans) == 12
    assert chunk_end(0, 9, spans) == 9 and chunk_end(0, 10, spans) == 10  # boundaries are fine
    assert chunk_end(0, 5, []) == 5


def test_prefill_chunks_keep_atomic_spans_whole_whatever_the_budget():
    """Gemma 3's images attend both ways, so a chunk may not split one (`ModelFamily.prefill_spans`)."""
    spans = ((2, 12), (14, 20))
    core = Core(EngineConfig(max_batch_size=4, max_num_batched_tokens=4))
    core.add("a", max_tokens=20, ignore_eos=True)
    core.run(max_steps=2)
    img = core.add("img", prompt_len=24, max_tokens=2, spans=spans)
    core.run(until=lambda: img.final is not None)
    chunks = [(c.start, c.end) for out in core.runner.calls for c in out.chunks if c.request_id == "img"]
    assert chunks[0][0] == 0 and chunks[-1][1] == 24
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))  # contiguous, in order
    for start, end in chunks:
        assert not any(a < cut < b for cut in (start, end) for a, b in spans), (start, end)
    assert (2, 12) in chunks  # the 10-token span ran alone in one chunk, over the 4-token budget
    assert img.final.finish_reason == "length"


def test_max_bundles_per_batch_is_strict_fifo():
    core = Core(EngineConfig(max_batch_size=4, max_num_batched_tokens=64, max_bundles_per_batch=1))
    core.add("x1", bundle="x", max_tokens=3)
    core.add("y1", bundle="y", max_tokens=3)
    core.add("x2", bundle="x", max_tokens=3)
    core.run()
    admitted = [[r.request_id for r in out.new] for out in core.runner.calls if out.new]
    assert admitted == [["x1"], ["y1"], ["x2"]]


def test_full_queue_refuses_with_retry():
    core = Core(EngineConfig(max_batch_size=1, max_queue=1, max_num_batched_tokens=8))
    core.add("a")
    with pytest.raises(QueueFullError, match="retry"):
        core.add("b")


def test_config_refuses_a_budget_below_the_batch():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_batch_size=16, max_num_batched_tokens=8)


# ---------------------------------------------------------------- the real loop thread, the asyncio front
class FakePreprocessor:
    eos_ids = frozenset({EOS})

    def prepare(self, request, entry):
        from engine_fakes import make_row

        return make_row(request.request_id, 4)


def test_generate_streams_and_the_loop_sleeps_when_nothing_can_run():
    core = Core(scripts={"g": [4, 5, EOS]})
    core.engine.preprocessor = FakePreprocessor()
    core.clock.now = 0.0

    async def scenario():
        await core.engine.start()
        try:
            request = GenerationRequest("g", [], [], None, SamplingParams(max_tokens=10), arrival=0.0)
            events = [e async for e in core.engine.generate(request)]
            await asyncio.sleep(0.1)  # let the loop free the finished row
            calls = len(core.runner.calls)
            await asyncio.sleep(0.5)
            return events, calls, len(core.runner.calls)
        finally:
            await core.engine.stop()

    events, calls_before, calls_after = asyncio.run(scenario())
    assert "".join(e.text for e in events) == "<4><5>" and events[-1].finish_reason == "stop"
    assert calls_after == calls_before, "an idle engine must not step"
    assert core.runner.rows == {}


def test_wait_for_change_returns_at_once_after_an_add():
    core = Core()
    request, _ = make_request("late")
    core.outputs.start(request)
    core.scheduler.schedule()
    core.scheduler.add(request)  # between schedule() and the wait: must not be lost
    done = threading.Event()
    thread = threading.Thread(target=lambda: (core.scheduler.wait_for_change(30), done.set()))
    thread.start()
    thread.join(10)
    assert done.is_set()


def test_the_engine_core_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, server.engine.engine, server.engine.scheduler, server.engine.outputs, server.engine.config;"
        "sys.exit(int('torch' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_call_in_loop_runs_on_the_engine_thread_between_steps_and_inline_when_stopped():
    """Cold bundle prefixes are computed on the loop thread (`Engine.call_in_loop`), not beside a step."""
    core = Core()
    engine = core.engine
    asyncio.run(engine.start())
    try:
        where = engine.call_in_loop(lambda: threading.current_thread().name).result(timeout=10)
        assert where == "m2pt-engine"
        failing = engine.call_in_loop(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=10)
    finally:
        asyncio.run(engine.stop())
    after = engine.call_in_loop(lambda: threading.current_thread().name)
    assert after.done() and after.result() == threading.current_thread().name
