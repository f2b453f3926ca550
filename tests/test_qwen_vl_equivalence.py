"""Qwen2.5-VL and Qwen3-VL prompt math: prefix-KV == the official per-layer overwrite; a mixed batch (different
bundles, different image sizes, a no-bundle row) == each row alone; no bundle == the HF model (logits and greedy
`generate`); gradients reach prompts and projector only. Tiny random-init checkpoints with each family's structure."""

from __future__ import annotations

import pytest
import torch
from qwen_helpers import ATOL, FAMILIES, load_tiny_qwen, make_row, reference_logits, strong_prompts

from m2pt.forward import DecodeState, RowInput

VARIANTS = [(3, 2, True), (4, 0, False), (0, 3, False), (0, 0, True), (5, 1, True)]
TWO_IMAGES = [(48, 64), (32, 32)]  # 6x8 and 4x4 patches: several windows of different sizes in Qwen2.5-VL


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request, tmp_path_factory):
    """(checkpoint dir, FrozenLlava) of a tiny Qwen2.5-VL / Qwen3-VL, loaded through the startup gate."""
    return load_tiny_qwen(tmp_path_factory, request.param)


def ours_logits(frozen, ids, images, prompts):
    family = frozen.family
    prefix = None if prompts is None else family.compute_prefix(frozen.model, prompts)
    feats = family.encode_images(frozen.model, images, [prefix] * len(images))
    row = RowInput(ids, torch.cat(feats) if feats else None, prefix, tuple(images))
    logits, _ = family.prefill(frozen.model, [row], all_logits=True)
    return logits[0]


@pytest.mark.parametrize("text_len,visual_len,projector", VARIANTS)
def test_prefix_kv_equals_official_overwrite(qwen, text_len, visual_len, projector):
    _, frozen = qwen
    prompts = strong_prompts(frozen, text_len, visual_len, projector, seed=text_len * 10 + visual_len)
    ids, images, _ = make_row(frozen, "what is this digit ?", TWO_IMAGES, seed=1)
    with torch.no_grad():
        ref = reference_logits(frozen, ids, images, prompts)
        ours = ours_logits(frozen, ids, images, prompts)
        base = reference_logits(frozen, ids, images, None)
    assert torch.allclose(ours, ref, atol=ATOL), (ours - ref).abs().max()
    assert (ref - base).abs().max() > 1e-2, (
        "the prompts must change the output for this test to mean anything"
    )


def test_no_bundle_equals_hf_model_logits(qwen):
    _, frozen = qwen
    ids, images, encoded = make_row(frozen, "what digit ?", TWO_IMAGES, seed=2)
    with torch.no_grad():
        hf = frozen.model(**encoded).logits[0]
        ours = ours_logits(frozen, ids, images, None)
    assert torch.allclose(ours, hf, atol=ATOL), (ours - hf).abs().max()


def greedy_alone(frozen, ids, images, prefix, steps, suppress=None):
    family, model = frozen.family, frozen.model
    feats = family.encode_images(model, images, [prefix] * len(images))
    logits, state = family.prefill(
        model, [RowInput(ids, torch.cat(feats) if feats else None, prefix, tuple(images))]
    )
    all_logits, tokens = [logits[0]], []
    for _ in range(steps):
        scores = all_logits[-1].clone()
        if suppress is not None:  # what HF's min_new_tokens does to EOS
            scores[suppress] = float("-inf")
        tokens.append(int(scores.argmax()))
        all_logits.append(family.decode_step(model, state, torch.tensor([tokens[-1]]))[0])
    return torch.stack(all_logits), tokens


def test_no_bundle_greedy_equals_hf_generate(qwen):
    _, frozen = qwen
    ids, images, encoded = make_row(frozen, "what is this ?", [(64, 48)], seed=3)
    steps = 10
    with torch.no_grad():
        hf = frozen.model.generate(**encoded, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        _, ours = greedy_alone(
            frozen, ids, images, None, steps, suppress=frozen.processor.tokenizer.eos_token_id
        )
    hf_tokens = hf[0, ids.shape[0] :].tolist()
    assert len(hf_tokens) == steps and ours == hf_tokens, (ours, hf_tokens)
    assert len(set(ours)) > 1, "a degenerate model would make this comparison weak"


def test_mixed_batch_equals_each_row_alone(qwen):
    """Five bundles (different Lt, Lv, projector or not) + a no-bundle row; different image sizes and counts."""
    _, frozen = qwen
    family, model = frozen.family, frozen.model
    prefixes = [
        family.compute_prefix(model, strong_prompts(frozen, lt, lv, pj, seed=i))
        for i, (lt, lv, pj) in enumerate(VARIANTS)
    ]
    prefixes.append(None)
    specs = [
        ("what", [(48, 64)]),
        ("what is this", [(32, 32)]),
        ("digit ?", [(64, 48), (16, 16)]),
        ("is this digit ? what", [(64, 64)]),
        ("this", []),
        ("what is", [(48, 32)]),
    ]
    rows = [make_row(frozen, words, sizes, seed=10 + i)[:2] for i, (words, sizes) in enumerate(specs)]
    steps = 6
    with torch.no_grad():
        alone = [
            greedy_alone(frozen, ids, ims, pre, steps) for (ids, ims), pre in zip(rows, prefixes, strict=True)
        ]
        all_images = [im for _, ims in rows for im in ims]
        owners = [pre for (_, ims), pre in zip(rows, prefixes, strict=True) for _ in ims]
        feats = iter(family.encode_images(model, all_images, owners))  # one tower pass for every image
        batch = []
        for (ids, ims), pre in zip(rows, prefixes, strict=True):
            row_feats = [next(feats) for _ in ims]
            batch.append(RowInput(ids, torch.cat(row_feats) if row_feats else None, pre, tuple(ims)))
        logits, state = family.prefill(model, batch)
        got_logits, got_tokens = [logits], []
        for _ in range(steps):
            got_tokens.append(logits.argmax(-1))
            logits = family.decode_step(model, state, got_tokens[-1])
            got_logits.append(logits)
    stacked = torch.stack(got_logits, dim=1)  # [B, steps+1, V]
    assert len({tuple(t) for _, t in alone}) > 1, "bundles should lead to different generations"
    for b, (ref_logits, ref_tokens) in enumerate(alone):
        assert torch.allclose(stacked[b], ref_logits, atol=ATOL), (b, (stacked[b] - ref_logits).abs().max())
        assert [int(t[b]) for t in got_tokens] == ref_tokens


def test_rows_join_and_leave_between_decode_steps(qwen):
    """`DecodeState.merge/select` keep each row's M-RoPE decode position."""
    _, frozen = qwen
    family, model = frozen.family, frozen.model
    prefixes = [
        family.compute_prefix(model, strong_prompts(frozen, lt, lv, pj, seed=i))
        for i, (lt, lv, pj) in enumerate(VARIANTS[:2])
    ]
    rows = [
        make_row(frozen, w, s, seed=30 + i)[:2]
        for i, (w, s) in enumerate([("what", [(64, 32)]), ("digit", [(32, 64)])])
    ]
    with torch.no_grad():
        alone = [
            greedy_alone(frozen, ids, ims, pre, 5)[1] for (ids, ims), pre in zip(rows, prefixes, strict=True)
        ]

        def start(i):
            ids, ims = rows[i]
            feats = family.encode_images(model, ims, [prefixes[i]] * len(ims))
            logits, state = family.prefill(model, [RowInput(ids, torch.cat(feats), prefixes[i], tuple(ims))])
            return logits.argmax(-1), state

        tok_a, state = start(0)
        out = {0: [int(tok_a[0])]}
        tokens = family.decode_step(model, state, tok_a).argmax(-1)
        out[0].append(int(tokens[0]))
        tok_b, state_b = start(1)
        state = DecodeState.merge([state, state_b])
        tokens = torch.cat([tokens, tok_b])
        out[1] = [int(tok_b[0])]
        for _ in range(3):
            tokens = family.decode_step(model, state, tokens).argmax(-1)
            out[0].append(int(tokens[0]))
            out[1].append(int(tokens[1]))
        state = state.select([1])
        tokens = family.decode_step(model, state, tokens[1:]).argmax(-1)
        out[1].append(int(tokens[0]))
    assert out[0] == alone[0] and out[1] == alone[1]


def test_gradients_reach_prompts_and_projector_only(qwen):
    _, frozen = qwen
    family, model = frozen.family, frozen.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = strong_prompts(frozen, 3, 2, True, seed=7)
    params = prompts.parameters()
    for p in params:
        p.requires_grad_(True)
    ids, images, _ = make_row(frozen, "what is this digit ?", TWO_IMAGES, seed=4)
    prefix = family.compute_prefix(model, prompts)
    feats = family.encode_images(model, images, [prefix] * len(images))
    logits, _ = family.prefill(
        model, [RowInput(ids, torch.cat(feats), prefix, tuple(images))], all_logits=True
    )
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]).backward()
    for name, p in zip(["text", "visual", *sorted(prompts.projector)], params, strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())
    snapshot = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-2).step()
    assert all(not torch.equal(a, b) for a, b in zip(snapshot, params, strict=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_processor_is_image_only_and_refuses_videos(qwen):
    """Loaded without torchvision: the family's processor class with the PIL image processor and no video one."""
    _, frozen = qwen
    processor = frozen.processor
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.video_processor is None
    assert type(processor).__mro__[1].__name__ in ("Qwen2_5_VLProcessor", "Qwen3VLProcessor")
    with pytest.raises(Exception):  # noqa: B017 (any refusal; the point is that no video path exists)
        processor(text=["<|video_pad|>"], videos=[torch.zeros(2, 3, 32, 32)], return_tensors="pt")


@pytest.mark.parametrize("cuts", [[], [4], [6, 9], [1, 2, 3, 25]])
def test_chunked_prefill_equals_one_shot(qwen, cuts):
    """Chunks may split an image's placeholders; positions, deepstack and the bundle prefix carry across."""
    _, frozen = qwen
    family, model = frozen.family, frozen.model
    prefix = family.compute_prefix(model, strong_prompts(frozen, 3, 2, True, seed=5))
    ids, images, _ = make_row(frozen, "what is this digit ?", TWO_IMAGES, seed=8)
    with torch.inference_mode():
        feats = torch.cat(family.encode_images(model, images, [prefix] * len(images)))
        row = RowInput(ids, feats, prefix, tuple(images))
        want, want_state = family.prefill(model, [row])
        bounds = [0, *cuts, int(ids.shape[0])]
        state = None
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            got, state = family.prefill_chunk(model, row, start, end, state)
        assert torch.equal(state.positions, want_state.positions)
        steps_got, steps_want = [got[0]], [want[0]]
        for _ in range(3):
            steps_got.append(family.decode_step(model, state, steps_got[-1].argmax()[None])[0])
            steps_want.append(family.decode_step(model, want_state, steps_want[-1].argmax()[None])[0])
    diff = (torch.stack(steps_got) - torch.stack(steps_want)).abs().max()
    assert diff <= ATOL, diff
