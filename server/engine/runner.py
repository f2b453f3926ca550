"""The model side of the engine: `execute(scheduler_output) -> RunnerOutput`. Owns the per-request cached state
(image features, the cache of a row being prefilled, its sampler) and the running batch's decode state; all
tensor work goes through one `ModelOps` object (the model family's adapter).

When the ops can pack (`ModelOps.can_pack`: LLaVA-style LLMs, see `m2pt.packed`), a step's prompt chunks and
decode rows run as ONE LLM forward; otherwise (and whenever the packed forward raises, after rolling every
state back) each chunk runs alone and then the decode batch.

Failure isolation: an image encode or a prompt chunk that raises fails only its own request (its state is
dropped, the others run on untouched). A batched decode step that raises is undone and each row is tried alone
on a copy; the rows that raise alone fail, the others decode again without them (so they produce what they
would have without the failing row). Anything else that escapes
`execute` is an engine-level fault: the engine then fails every admitted request and calls `reset()`.
Not thread-safe: only the engine loop thread calls it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from m2pt.forward import RowInput
from m2pt.packed import ChunkInput
from server.engine.model_ops import ModelOps
from server.engine.sampling import make_generator, sample_batch
from server.engine.scheduler import PrefillChunk, RunnerOutput, SchedulerOutput
from server.engine.types import PreparedRow, SamplingParams

log = logging.getLogger(__name__)


class ImageFeatureCache:
    """LRU of projected image features keyed by (image content hash, bundle content hash)."""

    def __init__(self, capacity: int, metrics=None) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._metrics = metrics

    def get(self, key: tuple[str, str]) -> Tensor | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        if self._metrics is not None:
            (self._metrics.image_cache_hits if hit is not None else self._metrics.image_cache_misses).inc()
        return hit

    def put(self, key: tuple[str, str], features: Tensor) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


@dataclass
class _RowState:
    row: PreparedRow
    sampling: SamplingParams
    generator: torch.Generator | None
    features: Tensor | None = None  # [n_image_tokens, D]
    state: Any = None  # the row's own cache while it is prefilled
    last_token: int = -1

    def row_input(self) -> RowInput:
        return RowInput(self.row.input_ids, self.features, self.row.prefix, tuple(self.row.images or ()))


class ModelRunner:
    def __init__(
        self,
        ops: ModelOps,
        image_cache: ImageFeatureCache,
        sampler: Callable[[Tensor, list, list], list[int]] = sample_batch,
    ) -> None:
        self.ops = ops
        self.images = image_cache
        self._sample = sampler
        self._rows: dict[str, _RowState] = {}
        self._batch: Any = None  # the decode batch's state
        self._batch_ids: list[str] = []

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Free finished rows, register new ones, encode, prefill chunks, decode; see the module contract."""
        self.free(out.finished)
        for request in out.new:
            device = self.ops.device
            self._rows[request.request_id] = _RowState(
                request.row, request.sampling, make_generator(request.sampling, device)
            )
        result = RunnerOutput()
        self._encode(out.encode, result)
        self._check_decode_rows(out.decode)
        joined = self._packed(out, result) if self.ops.can_pack else None
        if joined is None:  # not packable, or the packed forward raised: one forward per part
            joined = [c.request_id for c in out.chunks if self._prefill(c, result) and c.is_last]
            self._decode(out.decode, result)
        self._join(joined)
        return result

    def free(self, request_ids: Sequence[str]) -> None:
        """Forget finished requests (unknown ids are ignored)."""
        gone = set(request_ids)
        for request_id in gone:
            self._rows.pop(request_id, None)
        drop = [i for i, rid in enumerate(self._batch_ids) if rid in gone]
        if len(drop) == len(self._batch_ids):
            self._batch, self._batch_ids = None, []
        elif drop:
            order = self.ops.remove_rows(self._batch, drop)
            self._batch_ids = [self._batch_ids[i] for i in order]

    def reset(self) -> None:
        """Forget everything (after an engine-level fault)."""
        self._rows.clear()
        self._batch, self._batch_ids = None, []

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ images
    def _encode(self, request_ids: Sequence[str], result: RunnerOutput) -> None:
        """Image features of every request in `request_ids`, from the cache or one batched encode; when the
        batched encode raises, each request is encoded alone so only the failing ones fail."""
        rows = [self._rows[rid] for rid in request_ids if rid in self._rows]
        try:
            self._encode_rows(rows)
        except Exception:
            if len(rows) == 1:
                self._fail(request_ids[0], result, "image encode")
                return
            for rid, row in zip(request_ids, rows, strict=True):
                try:
                    self._encode_rows([row])
                except Exception:
                    self._fail(rid, result, "image encode")

    def _encode_rows(self, rows: Sequence[_RowState]) -> None:
        found: dict[tuple[str, str], Tensor] = {}
        missing: dict[tuple[str, str], tuple[Tensor, Any]] = {}
        for rs in rows:
            for idx, key in enumerate(rs.row.image_keys):
                cache_key = (key, rs.row.bundle_key)
                if cache_key in found or cache_key in missing:
                    continue
                hit = self.images.get(cache_key)
                if hit is not None:
                    found[cache_key] = hit
                else:
                    images = getattr(
                        rs.row, "images", None
                    )  # a family's per-image inputs, when it splits them
                    image = images[idx] if images else rs.row.pixel_values[idx]
                    missing[cache_key] = (image, rs.row.prefix)
        if missing:
            encoded = self.ops.encode_images(
                [px for px, _ in missing.values()], [p for _, p in missing.values()]
            )
            for cache_key, features in zip(missing, encoded, strict=True):
                found[cache_key] = features
                self.images.put(cache_key, features)
        for rs in rows:
            keys = [(key, rs.row.bundle_key) for key in rs.row.image_keys]
            rs.features = torch.cat([found[k] for k in keys]) if keys else None

    # ------------------------------------------------------------------ prompt and decode
    def _prefill(self, chunk: PrefillChunk, result: RunnerOutput) -> bool:
        """Run one chunk; True on success. The last chunk samples the request's first token."""
        rs = self._rows.get(chunk.request_id)
        if rs is None or chunk.request_id in result.failed:
            return False
        try:
            logits, rs.state = self.ops.prefill_chunk(rs.row_input(), chunk.start, chunk.end, rs.state)
            if chunk.is_last:
                rs.last_token = self._sample(logits.float(), [rs.sampling], [rs.generator])[0]
                result.sampled[chunk.request_id] = rs.last_token
        except Exception:
            self._fail(chunk.request_id, result, "prefill")
            return False
        return True

    def _check_decode_rows(self, request_ids: Sequence[str]) -> None:
        if sorted(request_ids) != sorted(self._batch_ids):
            raise RuntimeError(
                f"decode rows {sorted(request_ids)} != the batch's rows {sorted(self._batch_ids)}"
            )

    def _packed(self, out: SchedulerOutput, result: RunnerOutput) -> list[str] | None:
        """The step's prompt chunks and decode rows in ONE forward; returns the requests whose prompt is now
        complete, or None when there is nothing to pack or the forward raised (then every state is rolled back
        and the caller runs the parts one by one, which isolates the failing request)."""
        chunks = [c for c in out.chunks if c.request_id in self._rows and c.request_id not in result.failed]
        if not chunks or (len(chunks) == 1 and not self._batch_ids):
            return None  # a lone chunk is already one forward
        states = [self._rows[c.request_id] for c in chunks]
        undo = self._checkpoints(states)
        if undo is None:
            return None
        inputs = [
            ChunkInput(rs.row_input(), c.start, c.end, rs.state) for c, rs in zip(chunks, states, strict=True)
        ]
        decoding = [self._rows[rid] for rid in self._batch_ids]
        tokens = torch.tensor([rs.last_token for rs in decoding], dtype=torch.long) if decoding else None
        try:
            logits, chunk_logits, new_states = self.ops.packed_step(self._batch, tokens, inputs)
        except Exception:
            log.warning("packed step failed; running its parts one by one", exc_info=True)
            undo()
            return None
        if logits is not None:
            self._sample_decode(decoding, logits, result)
        joined = []
        for chunk, rs, chunk_logit, state in zip(chunks, states, chunk_logits, new_states, strict=True):
            rs.state = state
            if chunk.is_last:
                rs.last_token = self._sample(chunk_logit.float(), [rs.sampling], [rs.generator])[0]
                result.sampled[chunk.request_id] = rs.last_token
                joined.append(chunk.request_id)
        return joined

    def _checkpoints(self, states: Sequence[_RowState]) -> Callable[[], None] | None:
        """A function that undoes a packed step on the decode batch and `states` (None: not undoable)."""
        targets = [self._batch] if self._batch is not None else []
        targets += [rs.state for rs in states if rs.state is not None]
        marks = [self.ops.checkpoint(t) for t in targets]
        if any(mark is None for mark in marks):
            return None

        def undo() -> None:
            for target, mark in zip(targets, marks, strict=True):
                self.ops.rollback(target, mark)

        return undo

    def _decode(self, request_ids: Sequence[str], result: RunnerOutput) -> None:
        if not self._batch_ids:
            return
        checkpoint = self.ops.checkpoint(self._batch)
        try:
            self._decode_batch(result)
            return
        except Exception:
            log.exception("decode step of %d rows failed; retrying the rows one by one", len(self._batch_ids))
        bad = self._find_failing_rows(checkpoint)
        for rid in bad:
            result.failed[rid] = "the model failed on this request during decode"
        self.free(bad)
        if self._batch_ids:
            try:
                self._decode_batch(result)
            except Exception:
                log.exception("decode failed again without the failing rows; failing the batch")
                for rid in self._batch_ids:
                    result.failed[rid] = "the model failed on this request during decode"
                self.free(list(self._batch_ids))

    def _decode_batch(self, result: RunnerOutput) -> None:
        rows = [self._rows[rid] for rid in self._batch_ids]
        tokens = torch.tensor([rs.last_token for rs in rows], dtype=torch.long)
        self._sample_decode(rows, self.ops.decode_step(self._batch, tokens), result)

    def _sample_decode(self, rows: Sequence[_RowState], logits: Tensor, result: RunnerOutput) -> None:
        """Sample one token per decode row from `logits` [B, V] (rows in batch order)."""
        sampled = self._sample(logits.float(), [rs.sampling for rs in rows], [rs.generator for rs in rows])
        for rid, rs, token in zip(self._batch_ids, rows, sampled, strict=True):
            rs.last_token = token
            result.sampled[rid] = token

    def _find_failing_rows(self, checkpoint: Any) -> list[str]:
        """After a failed batched decode: undo it and run each row alone on a copy; the rows that raise alone
        (all of them when the step cannot be undone or no row raises alone) are the failing ones."""
        if checkpoint is None:
            return list(self._batch_ids)
        self.ops.rollback(self._batch, checkpoint)
        bad = []
        for i, rid in enumerate(self._batch_ids):
            token = torch.tensor([self._rows[rid].last_token], dtype=torch.long)
            try:
                self.ops.decode_step(self.ops.row_copy(self._batch, i), token)
            except Exception:
                bad.append(rid)
        return bad or list(self._batch_ids)

    def _join(self, request_ids: Sequence[str]) -> None:
        """Rows whose prompt is complete join the decode batch (they decode from the next step)."""
        if not request_ids:
            return
        states = [self._rows[rid].state for rid in request_ids]
        self._batch = self.ops.merge(states if self._batch is None else [self._batch, *states])
        self._batch_ids += list(request_ids)
        for rid in request_ids:
            self._rows[rid].state = None

    def _fail(self, request_id: str, result: RunnerOutput, phase: str) -> None:
        log.exception("%s of request %s failed; failing that request only", phase, request_id)
        result.failed[request_id] = f"the model failed on this request during {phase}"
        self._rows.pop(request_id, None)
