"""Torch-free fakes for the engine core: a scripted runner, a tokenizer whose text is easy to read, and request
builders. The runner checks the scheduler's contract (chunks continue where the last one ended, decode rows are
exactly the rows whose prompt is complete) so a scheduler bug fails loudly."""

from __future__ import annotations

from collections.abc import Callable

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.outputs import OutputProcessor
from server.engine.request import Request
from server.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from server.engine.types import PreparedRow, SamplingParams, StreamEvent

EOS = 2


class FakeTokenizer:
    """Token i decodes to "<i>"; special tokens (EOS) decode to nothing."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == EOS))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedRunner:
    """Samples each request's scripted tokens in order (then 9s). `fail_prefill` ids raise in their first
    chunk; `raise_step` makes the next `execute` raise (an engine-level fault)."""

    def __init__(self, scripts: dict[str, list[int]] | None = None) -> None:
        self.scripts = scripts or {}
        self.fail_prefill: set[str] = set()
        self.raise_step = False
        self.rows: dict[str, int] = {}  # request id -> prompt tokens computed
        self.decoding: set[str] = set()
        self.calls: list[SchedulerOutput] = []
        self.resets = 0

    def _next(self, request_id: str) -> int:
        script = self.scripts.setdefault(request_id, [])
        return script.pop(0) if script else 9

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.calls.append(out)
        if self.raise_step:
            self.raise_step = False
            raise RuntimeError("injected engine-level fault")
        for rid in out.finished:
            self.rows.pop(rid, None)
            self.decoding.discard(rid)
        for request in out.new:
            assert request.request_id not in self.rows
            self.rows[request.request_id] = 0
        assert set(out.decode) == self.decoding, (out.decode, self.decoding)
        result = RunnerOutput()
        for chunk in out.chunks:
            rid = chunk.request_id
            if rid in self.fail_prefill:
                result.failed[rid] = "the model failed on this request during prefill"
                self.rows.pop(rid)
                continue
            assert self.rows[rid] == chunk.start, (rid, self.rows[rid], chunk)
            self.rows[rid] = chunk.end
            if chunk.is_last:
                result.sampled[rid] = self._next(rid)
        for rid in out.decode:
            result.sampled[rid] = self._next(rid)
        self.decoding |= {c.request_id for c in out.chunks if c.is_last and c.request_id not in result.failed}
        return result

    def reset(self) -> None:
        self.resets += 1
        self.rows.clear()
        self.decoding.clear()


def make_row(
    request_id: str, prompt_len: int, image_tokens: int = 0, bundle: str = "base", spans=()
) -> PreparedRow:
    ids = [7] * prompt_len
    images = ["img"] if image_tokens else []
    return PreparedRow(request_id, ids, None, images, None, bundle, image_tokens, atomic_spans=tuple(spans))


class Collected:
    """The events of one request."""

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []

    def __call__(self, event: StreamEvent) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def final(self) -> StreamEvent | None:
        return self.events[-1] if self.events and self.events[-1].finish_reason else None


def make_request(
    request_id: str,
    prompt_len: int = 4,
    *,
    max_tokens: int = 8,
    stop: tuple[str, ...] = (),
    image_tokens: int = 0,
    bundle: str = "base",
    deadline: float | None = None,
    ignore_eos: bool = False,
    spans: tuple[tuple[int, int], ...] = (),
) -> tuple[Request, Collected]:
    sink = Collected()
    request = Request(
        request_id=request_id,
        row=make_row(request_id, prompt_len, image_tokens, bundle, spans),
        sampling=SamplingParams(max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos),
        bundle_key=bundle,
        bundle_label=None if bundle == "base" else f"{bundle}@v1",
        eos_ids=frozenset({EOS}),
        emit=sink,
        arrival=0.0,
        deadline=deadline,
    )
    return request, sink


class Core:
    """An `Engine` over the real scheduler and output processor with a scripted runner, driven by `step()`."""

    def __init__(self, config: EngineConfig | None = None, scripts=None, metrics=None) -> None:
        self.clock = FakeClock()
        self.config = config or EngineConfig(max_batch_size=4, max_num_batched_tokens=64)
        self.outputs = OutputProcessor(FakeTokenizer())
        self.scheduler = Scheduler(self.config, self.outputs.push, clock=self.clock)
        self.runner = ScriptedRunner(scripts)
        self.engine = Engine(
            config=self.config,
            scheduler=self.scheduler,
            runner=self.runner,
            preprocessor=None,
            outputs=self.outputs,
            residency=None,
            store=None,
            model_id="fake",
            metrics=metrics,
            clock=self.clock,
        )

    def add(self, request_id: str, *args, **kwargs) -> Collected:
        request, sink = make_request(request_id, *args, **kwargs)
        self.outputs.start(request)
        self.scheduler.add(request)
        return sink

    def run(self, max_steps: int = 200, until: Callable[[], bool] | None = None) -> int:
        """Step until nothing is left (or `until()`); returns the steps that did work."""
        steps = 0
        for _ in range(max_steps):
            if until is not None and until():
                break
            if not self.engine.step():
                break
            steps += 1
        return steps
