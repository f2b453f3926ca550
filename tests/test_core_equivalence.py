"""The prompt math: prefix-KV formulation == official per-layer overwrite; mixed batches == rows alone; no bundle ==
the unmodified HF model; gradients reach only prompts and projector."""

from __future__ import annotations

import pytest
import torch
from prompt_helpers import strong_prompts

from m2pt.forward import DecodeState, RowInput, decode_step, encode_images, prefill, select_image_features
from m2pt.prefix import compute_prefix
from m2pt.prompts import PromptTensors

ATOL = 1e-5


def make_row_tokens(tiny, words, seed):
    """Token ids `<s> user : <image>*N words assistant :` and a random image."""
    tok = tiny.processor.tokenizer
    n_img = tiny.spec.num_image_tokens
    ids = [1] + tok.convert_tokens_to_ids(["user", ":"]) + [tiny.spec.image_token_id] * n_img
    ids += tok.convert_tokens_to_ids(words) + tok.convert_tokens_to_ids(["assistant", ":"])
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, tiny.spec.image_size, tiny.spec.image_size, generator=gen)
    return torch.tensor(ids), pixels


# ---------------------------------------------------------------- reference: the official overwrite semantics
def reference_features(tiny, pixels, prompts: PromptTensors | None):
    """Projected image features [n, N, D] of images/tiles `pixels` [n, 3, H, W] with the visual prompt rows
    inserted and overwritten at every ViT layer's input.

    Runs EVERY ViT layer, also those past the deepest `vision_feature_layer` (which the core skips); those get a
    random prompt row, since a bundle carries none for them and nothing may depend on them."""
    model = tiny.model
    prompts = prompts or PromptTensors()
    tower = model.model.vision_tower
    lv, n = prompts.visual_len, pixels.shape[0]
    h = tower.embeddings(pixels)  # [n, (1+)N, Dv]
    if hasattr(tower, "pre_layrnorm"):  # CLIP; SigLIP has no pre-norm
        h = tower.pre_layrnorm(h)
    visual = prompts.visual
    if lv and visual.shape[0] < len(tower.encoder.layers):
        junk = torch.randn(len(tower.encoder.layers) - visual.shape[0], lv, visual.shape[-1]) * 40
        visual = torch.cat([visual, junk])
    if lv:
        h = torch.cat([visual[0][None].expand(n, -1, -1), h], dim=1)
    states = [h[:, lv:]]
    for i, layer in enumerate(tower.encoder.layers):
        if lv:
            h = torch.cat([visual[i][None].expand(n, -1, -1), h[:, lv:]], dim=1)
        h = layer(h, None)
        states.append(h[:, lv:])
    feats = select_image_features(model, states)
    proj = model.model.multi_modal_projector
    if prompts.projector is not None:
        return torch.func.functional_call(proj, prompts.projector, (feats,))
    return proj(feats)


def reference_lm_logits(tiny, ids, feats, prompts: PromptTensors | None):
    """LLM logits [T, V] of one row `ids` [T] whose placeholders take `feats` [n_tokens, D], with the textual
    prompt rows inserted and overwritten at every LLM layer's input."""
    model = tiny.model
    prompts = prompts or PromptTensors()
    lt = prompts.text_len
    embeds = model.model.get_input_embeddings()(ids[None])
    slots = (ids[None] == tiny.spec.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(slots, feats)
    lm = model.model.language_model
    hooks = []
    if lt:
        embeds = torch.cat([prompts.text[0][None], embeds], dim=1)

        def overwrite(layer_idx):
            def hook(module, args, kwargs):
                hidden = torch.cat([prompts.text[layer_idx][None], args[0][:, lt:]], dim=1)
                return (hidden, *args[1:]), kwargs

            return hook

        hooks = [
            layer.register_forward_pre_hook(overwrite(i), with_kwargs=True)
            for i, layer in enumerate(lm.layers)
        ]
    try:
        positions = torch.arange(embeds.shape[1])[None]
        out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return model.lm_head(out.last_hidden_state[:, lt:])[0]  # [T, V]


def reference_logits(tiny, ids, pixels, prompts: PromptTensors | None):
    """Plain forward with prompt rows inserted and overwritten at every layer's input (one row, one image)."""
    feats = reference_features(tiny, pixels[None], prompts)  # [1, N, D]
    return reference_lm_logits(tiny, ids, feats[0], prompts)


def ours_logits(tiny, ids, pixels, prompts):
    prefix = None if prompts is None else compute_prefix(tiny.model, prompts)
    feats = encode_images(tiny.model, pixels[None], [prefix])
    logits, _ = prefill(tiny.model, [RowInput(ids, feats[0], prefix)], all_logits=True)
    return logits[0]


VARIANTS = [(3, 2, True), (4, 0, False), (0, 3, False), (0, 0, True), (5, 1, True)]


@pytest.mark.parametrize("text_len,visual_len,projector", VARIANTS)
def test_prefix_kv_equals_official_overwrite(tiny, text_len, visual_len, projector):
    prompts = strong_prompts(tiny, text_len, visual_len, projector, seed=text_len * 10 + visual_len)
    ids, pixels = make_row_tokens(tiny, ["what", "is", "this", "digit", "?"], seed=1)
    with torch.no_grad():
        ref = reference_logits(tiny, ids, pixels, prompts)
        ours = ours_logits(tiny, ids, pixels, prompts)
        base = reference_logits(tiny, ids, pixels, None)
    assert torch.allclose(ours, ref, atol=ATOL), (ours - ref).abs().max()
    assert (ref - base).abs().max() > 1e-2, (
        "the prompts must change the output for this test to mean anything"
    )


def test_no_bundle_row_equals_unmodified_hf_model(tiny):
    ids, pixels = make_row_tokens(tiny, ["what", "digit", "?"], seed=2)
    with torch.no_grad():
        hf = tiny.model(input_ids=ids[None], pixel_values=pixels[None]).logits[0]
        ours = ours_logits(tiny, ids, pixels, None)
    assert torch.allclose(ours, hf, atol=ATOL), (ours - hf).abs().max()


def greedy_alone(tiny, ids, pixels, prefix, steps):
    feats = encode_images(tiny.model, pixels[None], [prefix])
    logits, state = prefill(tiny.model, [RowInput(ids, feats[0], prefix)])
    all_logits, tokens = [logits[0]], []
    for _ in range(steps):
        tokens.append(int(all_logits[-1].argmax()))
        all_logits.append(decode_step(tiny.model, state, torch.tensor([tokens[-1]]))[0])
    return torch.stack(all_logits), tokens


def test_mixed_batch_equals_each_row_alone(tiny):
    """Five different bundles (different Lt, Lv, projector or not) + a no-bundle row, different lengths, one batch."""
    bundles = [
        compute_prefix(tiny.model, strong_prompts(tiny, lt, lv, pj, seed=i))
        for i, (lt, lv, pj) in enumerate(VARIANTS)
    ]
    prefixes = [*bundles, None]
    sentences = [
        ["what"],
        ["what", "is", "this"],
        ["digit", "?"],
        ["is", "this", "digit", "?", "what"],
        ["this"],
        ["what", "is"],
    ]
    rows = [make_row_tokens(tiny, words, seed=10 + i) for i, words in enumerate(sentences)]
    steps = 8
    with torch.no_grad():
        alone = [greedy_alone(tiny, ids, px, pre, steps) for (ids, px), pre in zip(rows, prefixes)]
        feats = encode_images(tiny.model, torch.stack([px for _, px in rows]), prefixes)
        batch = [RowInput(ids, feats[i], prefixes[i]) for i, (ids, _) in enumerate(rows)]
        logits, state = prefill(tiny.model, batch)
        got_logits, got_tokens = [logits], []
        for _ in range(steps):
            got_tokens.append(logits.argmax(-1))
            logits = decode_step(tiny.model, state, got_tokens[-1])
            got_logits.append(logits)
    stacked = torch.stack(got_logits, dim=1)  # [B, steps+1, V]
    distinct = {tuple(t) for _, t in alone}
    assert len(distinct) > 1, "bundles should lead to different generations"
    for b, (ref_logits, ref_tokens) in enumerate(alone):
        assert torch.allclose(stacked[b], ref_logits, atol=ATOL), (b, (stacked[b] - ref_logits).abs().max())
        assert [int(t[b]) for t in got_tokens] == ref_tokens


def test_rows_join_and_leave_between_decode_steps(tiny):
    """Continuous batching on DecodeState: merge a newly prefilled batch in, drop a finished row, results unchanged."""
    prefixes = [
        compute_prefix(tiny.model, strong_prompts(tiny, lt, lv, pj, seed=i))
        for i, (lt, lv, pj) in enumerate(VARIANTS[:3])
    ]
    rows = [
        make_row_tokens(tiny, w, seed=20 + i)
        for i, w in enumerate([["what"], ["is", "this", "digit"], ["digit"]])
    ]
    with torch.no_grad():
        alone = [greedy_alone(tiny, ids, px, pre, 6)[1] for (ids, px), pre in zip(rows, prefixes)]

        def start(i):
            ids, px = rows[i]
            feats = encode_images(tiny.model, px[None], [prefixes[i]])
            logits, state = prefill(tiny.model, [RowInput(ids, feats[0], prefixes[i])])
            return logits.argmax(-1), state

        tok_a, state = start(0)
        out = {0: [int(tok_a[0])]}
        tokens = tok_a
        tokens = decode_step(tiny.model, state, tokens).argmax(-1)
        out[0].append(int(tokens[0]))
        tok_b, state_b = start(1)
        tok_c, state_c = start(2)
        state = DecodeState.merge([state, state_b, state_c])
        tokens = torch.cat([tokens, tok_b, tok_c])
        out[1], out[2] = [int(tok_b[0])], [int(tok_c[0])]
        order = [0, 1, 2]
        while any(len(out[i]) < 6 for i in order):
            tokens = decode_step(tiny.model, state, tokens).argmax(-1)
            for pos, i in enumerate(order):
                out[i].append(int(tokens[pos]))
            done = [pos for pos, i in enumerate(order) if len(out[i]) >= 6]
            if done:
                keep = [pos for pos in range(len(order)) if pos not in done]
                state = state.select(keep)
                tokens = tokens[keep]
                order = [order[pos] for pos in keep]
    for i in range(3):
        assert out[i][:6] == alone[i], i


def test_gradients_reach_prompts_and_projector_only(tiny):
    model = tiny.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = strong_prompts(tiny, 3, 2, True, seed=7)
    params = prompts.parameters()
    for p in params:
        p.requires_grad_(True)
    ids, pixels = make_row_tokens(tiny, ["what", "is", "this", "digit", "?"], seed=3)
    opt = torch.optim.AdamW(params, lr=1e-2)
    prefix = compute_prefix(model, prompts)
    feats = encode_images(model, pixels[None], [prefix])
    logits, _ = prefill(model, [RowInput(ids, feats[0], prefix)], all_logits=True)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:])
    loss.backward()
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    snapshot = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(snapshot, params))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bfloat16_mixed_batch_tracks_float32(tiny, tiny_model_dir):
    """The reduced-precision path (what CUDA serves by default) runs the same code; on CPU it must track fp32."""
    from m2pt.loading import load_frozen_llava

    half = load_frozen_llava(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    prompts = strong_prompts(tiny, 3, 2, True, seed=1)
    rows = [make_row_tokens(tiny, ["what", "is"], seed=s) for s in range(3)]
    out = {}
    for frozen in (tiny, half):
        with torch.inference_mode():
            prefix = compute_prefix(frozen.model, prompts)
            prefixes = [prefix, None, prefix]
            feats = encode_images(frozen.model, torch.stack([px for _, px in rows]), prefixes)
            logits, _ = prefill(
                frozen.model, [RowInput(ids, feats[i], prefixes[i]) for i, (ids, _) in enumerate(rows)]
            )
        out[frozen.dtype] = logits.float()
    assert out[torch.bfloat16].dtype == torch.float32 and half.model.dtype == torch.bfloat16
    assert (out[torch.bfloat16] - out[torch.float32]).abs().max() < 0.02
    assert torch.equal(out[torch.bfloat16].argmax(-1), out[torch.float32].argmax(-1))
