"""Chunked prefill (`m2pt.forward.prefill_chunk`) == one-shot `prefill`, for rows of different bundles and
none: the same last-token logits (1e-5, fp32) whatever the chunking (chunks that cut through the image
placeholders, one-token chunks, one chunk), and the same greedy continuation after the chunked rows join one
decode batch."""

from __future__ import annotations

import pytest
import torch
from prompt_helpers import row_tokens, strong_prompts

from m2pt.forward import DecodeState, RowInput, decode_step, encode_images, prefill, prefill_chunk
from m2pt.prefix import compute_prefix

ATOL = 1e-5
VARIANTS = [(3, 2, True), (4, 0, False), (0, 3, False), None]  # (Lt, Lv, projector) or no bundle


def chunked(tiny, row: RowInput, bounds: list[int]) -> tuple[torch.Tensor, DecodeState]:
    state, logits = None, None
    for start, end in zip(bounds, bounds[1:], strict=False):
        logits, state = prefill_chunk(tiny.model, row, start, end, state)
    assert logits is not None and state is not None
    return logits, state


def make_rows(tiny):
    prefixes = [
        None if v is None else compute_prefix(tiny.model, strong_prompts(tiny, *v, seed=i))
        for i, v in enumerate(VARIANTS)
    ]
    words = [["what"], ["is", "this", "digit", "?"], ["digit"], ["what", "is"]]
    rows = []
    for i, prefix in enumerate(prefixes):
        ids, pixels = row_tokens(tiny, words[i], seed=40 + i)
        feats = encode_images(tiny.model, pixels[None], [prefix])[0]
        rows.append(RowInput(ids, feats, prefix))
    return rows


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@torch.inference_mode()
def test_chunked_prefill_equals_one_shot(tiny, chunk):
    rows = make_rows(tiny)
    for b, row in enumerate(rows):
        n = int(row.input_ids.shape[0])
        whole, _ = prefill(tiny.model, [row])
        bounds = [*range(0, n, chunk), n]
        got, state = chunked(tiny, row, bounds)
        assert torch.allclose(got, whole, atol=ATOL), (b, chunk, (got - whole).abs().max())
        assert int(state.positions[0]) == n + (0 if row.prefix is None else row.prefix.text_len)


@torch.inference_mode()
def test_chunk_boundaries_inside_the_image_and_uneven(tiny):
    rows = make_rows(tiny)
    n_img = tiny.spec.num_image_tokens
    for row in rows:
        n = int(row.input_ids.shape[0])
        whole, _ = prefill(tiny.model, [row])
        bounds = [0, 2, 3 + n_img // 2, 4 + n_img, n]  # cuts through the placeholders, then the words
        got, _ = chunked(tiny, row, bounds)
        assert torch.allclose(got, whole, atol=ATOL), (got - whole).abs().max()


@torch.inference_mode()
def test_chunked_rows_merged_decode_like_a_batch_prefill(tiny):
    rows = make_rows(tiny)
    steps = 6
    logits, state = prefill(tiny.model, rows)
    ref_tokens = [logits.argmax(-1)]
    for _ in range(steps):
        ref_tokens.append(decode_step(tiny.model, state, ref_tokens[-1]).argmax(-1))
    parts = [chunked(tiny, row, [0, 5, 9, int(row.input_ids.shape[0])]) for row in rows]
    state = DecodeState.merge([s for _, s in parts])
    tokens = [torch.cat([lg for lg, _ in parts]).argmax(-1)]
    for _ in range(steps):
        tokens.append(decode_step(tiny.model, state, tokens[-1]).argmax(-1))
    assert torch.equal(torch.stack(tokens), torch.stack(ref_tokens))
    assert len({tuple(t) for t in torch.stack(ref_tokens).T.tolist()}) > 1, "bundles must change the output"


def test_bad_chunks_and_missing_features_are_refused(tiny):
    row = make_rows(tiny)[3]
    with torch.inference_mode():
        with pytest.raises(ValueError, match="bad chunk"):
            prefill_chunk(tiny.model, row, 2, 4, None)
        with pytest.raises(ValueError, match="image placeholder tokens but 0 image feature rows"):
            prefill_chunk(tiny.model, RowInput(row.input_ids, None, None), 0, 4, None)


@torch.inference_mode()
def test_rows_join_and_leave_in_place_like_each_row_alone(tiny):
    """`DecodeState.extend` / `remove_rows` (one row copied per join or leave, swap-remove order, leading
    positions compacted) give every row the logits it has alone."""
    rows = make_rows(tiny)
    steps = 7

    def alone(row):
        logits, state = prefill_chunk(tiny.model, row, 0, int(row.input_ids.shape[0]))
        out = [logits[0]]
        for _ in range(steps):
            out.append(decode_step(tiny.model, state, out[-1].argmax()[None])[0])
        return out

    reference = [alone(row) for row in rows]
    got: dict[int, list[torch.Tensor]] = {}
    state, order = None, []  # order[i] = which row sits at batch position i

    def join(i):
        nonlocal state
        logits, row_state = prefill_chunk(tiny.model, rows[i], 0, int(rows[i].input_ids.shape[0]))
        got[i] = [logits[0]]
        if state is None:
            state = row_state
        else:
            assert state.extend([row_state]) or i == 3  # row 3 is the longest: it may not fit in place
            if len(order) + 1 != state.batch_size:
                state = DecodeState.merge([state, row_state])
        order.append(i)

    def step():
        tokens = torch.stack([got[i][-1].argmax() for i in order])
        logits = decode_step(tiny.model, state, tokens)
        for pos, i in enumerate(order):
            got[i].append(logits[pos])

    join(1)
    join(0)
    step()
    join(2)
    step()
    new_order = state.remove_rows([0], compact_at=1)  # row 1 leaves (it sat first): the last row moves up
    order[:] = [order[k] for k in new_order]
    assert order == [2, 0]
    step()
    join(3)
    for _ in range(steps):
        step()
        done = [pos for pos, i in enumerate(order) if len(got[i]) > steps]
        if done:
            new_order = state.remove_rows(done, compact_at=1)
            order[:] = [order[k] for k in new_order]
        if not order:
            break
    for i, ref in enumerate(reference):
        n = min(len(ref), len(got[i]))
        assert n >= 3
        assert torch.allclose(torch.stack(got[i][:n]), torch.stack(ref[:n]), atol=ATOL), i
