"""One LLM forward per engine step (`m2pt.packed.packed_step`) == the separate forwards it replaces: each prompt
chunk alone (`prefill_chunk`) and then the decode batch (`decode_step`). Rows of different bundles and none, a
first chunk that cuts through the image and a continuing one, several chunks in one step, a step with no decode
rows; the same logits (1e-5, fp32) and the same caches afterwards (checked by decoding on from both)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_engine_chunked import ATOL, make_rows

from m2pt.forward import DecodeState, decode_step, prefill_chunk
from m2pt.packed import ChunkInput, packed_step, supports_packing


def decode_batch(tiny, rows):
    """A decode batch of `rows` (whole prompts prefilled), and each row's next token."""
    parts = [prefill_chunk(tiny.model, row, 0, int(row.input_ids.shape[0])) for row in rows]
    state = DecodeState.merge([s for _, s in parts])
    return state, torch.cat([lg for lg, _ in parts]).argmax(-1)


def clone(state: DecodeState) -> DecodeState:
    return copy.deepcopy(state)


def continue_decoding(tiny, state: DecodeState, tokens: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        logits = decode_step(tiny.model, state, tokens)
        out.append(logits)
        tokens = logits.argmax(-1)
    return out


def test_the_llava_llm_uses_the_packed_attention(tiny):
    assert supports_packing(tiny.model)


@pytest.mark.parametrize("with_decode", [True, False])
@torch.inference_mode()
def test_packed_step_equals_the_separate_forwards(tiny, with_decode):
    rows = make_rows(tiny)  # 3 bundles (different lengths, with and without projector) and none
    batch, tokens = decode_batch(tiny, [rows[0], rows[3]]) if with_decode else (None, None)
    n_img = tiny.spec.num_image_tokens
    # row 1: its second chunk (the first one, through half the image, already ran); row 2: its first chunk
    _, started = prefill_chunk(tiny.model, rows[1], 0, 2 + n_img // 2)
    plan = [(rows[1], 2 + n_img // 2, 5 + n_img, started), (rows[2], 0, 3 + n_img // 3, None)]

    ref_batch = clone(batch) if batch is not None else None
    ref_chunks = []
    for row, start, end, state in plan:
        ref_chunks.append(prefill_chunk(tiny.model, row, start, end, None if state is None else clone(state)))
    ref_decode = decode_step(tiny.model, ref_batch, tokens) if ref_batch is not None else None

    chunks = [ChunkInput(row, start, end, state) for row, start, end, state in plan]
    got_decode, got_logits, got_states = packed_step(tiny.model, batch, tokens, chunks)

    if with_decode:
        assert got_decode is not None and got_decode.shape == ref_decode.shape
        assert torch.allclose(got_decode, ref_decode, atol=ATOL), (got_decode - ref_decode).abs().max()
        ahead = continue_decoding(tiny, batch, got_decode.argmax(-1))
        expect = continue_decoding(tiny, ref_batch, ref_decode.argmax(-1))
        for a, b in zip(ahead, expect, strict=True):
            assert torch.allclose(a, b, atol=ATOL), (a - b).abs().max()
    else:
        assert got_decode is None
    for (ref_logits, ref_state), logits, state in zip(ref_chunks, got_logits, got_states, strict=True):
        assert torch.allclose(logits, ref_logits, atol=ATOL), (logits - ref_logits).abs().max()
        assert torch.equal(state.positions, ref_state.positions)
        assert torch.equal(state.attention_mask, ref_state.attention_mask)
        ahead = continue_decoding(tiny, state, logits.argmax(-1))
        expect = continue_decoding(tiny, ref_state, ref_logits.argmax(-1))
        for a, b in zip(ahead, expect, strict=True):
            assert torch.allclose(a, b, atol=ATOL), (a - b).abs().max()


@torch.inference_mode()
def test_a_packed_step_that_raises_rolls_back_cleanly(tiny):
    """A chunk whose features are missing raises inside the packed forward; after `rollback` the decode batch
    decodes exactly as if the step had never been tried."""
    rows = make_rows(tiny)
    batch, tokens = decode_batch(tiny, [rows[0], rows[2]])
    reference = clone(batch)
    checkpoint = batch.checkpoint()
    broken = type(rows[1])(rows[1].input_ids, None, rows[1].prefix)  # placeholders but no features
    with pytest.raises(ValueError, match="image placeholder tokens"):
        packed_step(tiny.model, batch, tokens, [ChunkInput(broken, 0, 8, None)])
    batch.rollback(checkpoint)
    for a, b in zip(
        continue_decoding(tiny, batch, tokens), continue_decoding(tiny, reference, tokens), strict=True
    ):
        assert torch.equal(a, b)


def test_an_image_encode_is_budgeted_by_its_measured_cost_against_a_prompt_token(tiny):
    """`m2pt.calibrate` times the smoke image's encode and its prompt's prefill on the served model; the
    preprocessor turns that into each row's encode cost in the step budget, and `build_engine` wires it."""
    from m2pt.calibrate import encode_cost_per_placeholder
    from server.engine.config import EngineConfig
    from server.engine.factory import build_engine
    from server.engine.preprocess import Preprocessor

    ratio = encode_cost_per_placeholder(tiny, repeats=1)
    assert 0 < ratio < 100 and ratio == ratio
    pre = Preprocessor(tiny, ratio)
    n = tiny.spec.num_image_tokens
    assert pre._encode_cost(n) == max(1, math.ceil(n * ratio)) and pre._encode_cost(0) is None
    assert Preprocessor(tiny)._encode_cost(n) is None  # not measured: the scheduler counts placeholders
    engine = build_engine(tiny, None, EngineConfig(max_batch_size=2, max_num_batched_tokens=8), model_id="t")
    measured = engine.preprocessor.encode_cost_per_placeholder
    assert measured is not None and 0 < measured < 100
