"""Gemma 3 through the core's checks via the family interface: prefix-KV == the per-layer overwrite
reference (ViT and LLM, with HF's own Gemma 3 masks: bidirectional within an image, 5 local : 1 global
layers); no bundle == the HF model (logits, and greedy tokens of `generate` past the sliding window); a mixed
batch of 4 bundles + a no-bundle row == each alone; gradients reach prompts and projector only. The tiny
checkpoint keeps gemma-3-4b-it's config shape with a sliding window of 6 tokens, so prompts cross it
(training/tiny.py)."""

from __future__ import annotations

import pytest
import torch
from prompt_helpers import strong_prompts

from m2pt.forward import RowInput
from m2pt.prompts import PromptTensors

ATOL = 1e-5
WORDS = ["what", "is", "this", "digit", "?"]


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    from m2pt.loading import load_frozen_llava
    from training.tiny import build_tiny_llava, gemma3_cfg

    path = build_tiny_llava(tmp_path_factory.mktemp("gemma3"), gemma3_cfg())
    return load_frozen_llava(str(path), device="cpu", dtype="float32")


def picture(seed):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy())


def encode(g3, words, seed, images=1):
    text = "user : " + "<start_of_image> " * images + " ".join(words) + " assistant :"
    enc = g3.processor(images=[picture(seed + i) for i in range(images)], text=text, return_tensors="pt")
    return enc, enc["input_ids"][0], g3.family.split_images(enc)


def ours(g3, ids, images, prefix, all_logits=True):
    feats = g3.family.encode_images(g3.model, images, [prefix] * len(images))
    return g3.family.prefill(
        g3.model, [RowInput(ids, torch.cat(feats), prefix, images)], all_logits=all_logits
    )


def reference(g3, ids, images, prompts: PromptTensors | None):
    """Prompt rows inserted and overwritten at every ViT and LLM layer input; HF's Gemma 3 masks, forward."""
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    model, prompts = g3.model, prompts or PromptTensors()
    tower, lv, lt = model.model.vision_tower, prompts.visual_len, prompts.text_len
    feats = []
    for image in images:
        h = tower.embeddings(image.pixel_values[None])
        for i, layer in enumerate(tower.encoder.layers):
            if lv:
                h = torch.cat([prompts.visual[i][None], h[:, lv:] if i else h], dim=1)
            h = layer(h, None)
        last = tower.post_layernorm(h[:, lv:])
        proj = model.model.multi_modal_projector
        out = (
            proj(last)
            if prompts.projector is None
            else torch.func.functional_call(proj, prompts.projector, (last,))
        )
        feats.append(out[0])
    embeds = model.model.get_input_embeddings()(ids[None])
    slots = (ids[None] == g3.spec.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(slots, torch.cat(feats))
    token_type = (ids[None] == g3.spec.image_token_id).long()
    lm = model.model.language_model
    hooks = []
    if lt:
        embeds = torch.cat([prompts.text[0][None], embeds], dim=1)
        token_type = torch.cat([torch.zeros(1, lt, dtype=torch.long), token_type], dim=1)

        def overwrite(idx):
            def hook(module, args, kwargs):
                return (torch.cat([prompts.text[idx][None], args[0][:, lt:]], dim=1), *args[1:]), kwargs

            return hook

        hooks = [
            layer.register_forward_pre_hook(overwrite(i), with_kwargs=True)
            for i, layer in enumerate(lm.layers)
        ]
    positions = torch.arange(embeds.shape[1])[None]
    masks = create_masks_for_vision_model(
        config=model.config.get_text_config(),
        inputs_embeds=embeds,
        attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
        cache=None,
        position_ids=positions,
        block_sequence_ids=get_block_sequence_ids_for_mask(token_type),
    )
    try:
        out = lm(inputs_embeds=embeds, attention_mask=masks, position_ids=positions, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return model.lm_head(out.last_hidden_state[:, lt:])[0]


def test_prompt_is_longer_than_the_sliding_window(g3):
    _, ids, _ = encode(g3, WORDS, 0)
    assert ids.shape[0] > 2 * g3.model.config.text_config.sliding_window


@pytest.mark.parametrize(
    "text_len,visual_len,projector", [(3, 2, True), (0, 3, False), (4, 0, False), (5, 1, True)]
)
def test_prefix_kv_equals_overwrite_reference(g3, text_len, visual_len, projector):
    prompts = strong_prompts(g3, text_len, visual_len, projector, seed=text_len * 10 + visual_len)
    _, ids, images = encode(g3, WORDS, 1)
    with torch.no_grad():
        got = ours(g3, ids, images, g3.family.compute_prefix(g3.model, prompts))[0][0]
        ref = reference(g3, ids, images, prompts)
        base = reference(g3, ids, images, None)
    assert torch.allclose(got, ref, atol=ATOL), (got - ref).abs().max()
    assert (ref - base).abs().max() > 1e-2


def test_no_bundle_equals_hf_logits_and_generate(g3):
    for seed, images in ((2, 1), (3, 2)):
        enc, ids, imgs = encode(g3, WORDS[: seed + 1], seed, images)
        with torch.no_grad():
            hf = g3.model(**enc).logits[0]
            got, state = ours(g3, ids, imgs, None)
            assert torch.allclose(got[0], hf, atol=ATOL), (got[0] - hf).abs().max()
            hf_tokens = g3.model.generate(**enc, max_new_tokens=12, do_sample=False, suppress_tokens=[2])[
                0, ids.shape[0] :
            ]
            logits, tokens = got[:, -1], []
            for _ in range(12):
                tokens.append(int(logits.argmax(-1)))
                logits = g3.family.decode_step(g3.model, state, torch.tensor([tokens[-1]]))
        assert tokens == hf_tokens.tolist()


def greedy(g3, rows, steps):
    images = [im for _, ims, _ in rows for im in ims]
    feats = g3.family.encode_images(g3.model, images, [pre for _, ims, pre in rows for _ in ims])
    batch, k = [], 0
    for ids, ims, pre in rows:
        batch.append(RowInput(ids, torch.cat(feats[k : k + len(ims)]), pre, ims))
        k += len(ims)
    logits, state = g3.family.prefill(g3.model, batch)
    out, tokens = [logits], []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = g3.family.decode_step(g3.model, state, tokens[-1])
        out.append(logits)
    return torch.stack(out, dim=1), torch.stack(tokens, dim=1)


def test_mixed_batch_of_four_bundles_and_none_equals_each_alone(g3):
    variants = [(3, 2, True), (0, 3, False), (5, 1, True), (2, 2, False)]
    prefixes = [
        g3.family.compute_prefix(g3.model, strong_prompts(g3, *v, seed=i)) for i, v in enumerate(variants)
    ]
    prefixes.append(None)
    rows = []
    for i, prefix in enumerate(prefixes):
        _, ids, images = encode(g3, WORDS[: 1 + i], 40 + i, images=1 + i % 2)
        rows.append((ids, images, prefix))
    with torch.no_grad():
        alone = [greedy(g3, [row], 10) for row in rows]
        mixed_logits, mixed_tokens = greedy(g3, rows, 10)
    assert len({tuple(t[0].tolist()) for _, t in alone}) > 1
    for b, (logits, tokens) in enumerate(alone):
        assert torch.allclose(mixed_logits[b], logits[0], atol=ATOL), (
            b,
            (mixed_logits[b] - logits[0]).abs().max(),
        )
        assert torch.equal(mixed_tokens[b], tokens[0])


def test_gradients_reach_prompts_and_projector_only(g3):
    model = g3.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = strong_prompts(g3, 3, 2, True, seed=7)
    params = prompts.parameters()
    for p in params:
        p.requires_grad_(True)
    _, ids, images = encode(g3, WORDS, 3)
    logits, _ = ours(g3, ids, images, g3.family.compute_prefix(model, prompts))
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_steps_change_only_prompts_and_projector(g3, tmp_path):
    from test_train_mechanics import test_only_prompts_and_projector_change as frozen_check

    frozen_check(g3, tmp_path)


def test_trained_bundle_gives_training_logits_in_serving_path(g3, tmp_path):
    from test_train_mechanics import config

    from prompts_store.format import load_bundle
    from training.data import DataOptions, collate, load_data
    from training.params import PromptModule
    from training.trainer import train

    result = train(config(tmp_path, steps=3), base=g3)
    train_set, _ = load_data(
        DataOptions("digits", train_size=4, eval_size=1), g3.processor, g3.spec.image_size
    )
    batch = collate(train_set.examples)
    with torch.no_grad():
        training_logits = PromptModule(result.prompts, g3.model).logits(batch)  # [B, T, V]
    loaded = load_bundle(result.bundle_dir, spec=g3.spec)
    with torch.inference_mode():
        prefix = g3.family.compute_prefix(g3.model, loaded.prompts)
        rows = []
        for b, ids in enumerate(batch.input_ids):
            images = g3.family.split_images({"pixel_values": batch.pixel_values[b : b + 1]})
            feats = g3.family.encode_images(g3.model, images, [prefix])
            rows.append(RowInput(ids, feats[0], prefix, images))
        serving, _ = g3.family.prefill(g3.model, rows, all_logits=True)
    assert (serving - training_logits).abs().max() <= ATOL
    assert int((batch.input_ids[0] == g3.spec.image_token_id).sum()) == g3.spec.num_image_tokens


def test_chunked_prefill_equals_prefill_and_refuses_to_split_an_image(g3):
    """For the engine's chunked prefill: chunking at `chunk_end` boundaries == one prefill (then decode)."""
    prefix = g3.family.compute_prefix(g3.model, strong_prompts(g3, 3, 2, True, seed=9))
    _, ids, images = encode(g3, WORDS, 5, images=2)
    feats = torch.cat(g3.family.encode_images(g3.model, images, [prefix, prefix]))
    row = RowInput(ids, feats, prefix, images)
    first_image = int((ids == g3.spec.image_token_id).nonzero()[0])
    with torch.inference_mode():
        whole, state = g3.family.prefill(g3.model, [row])
        ref = [whole] + [g3.family.decode_step(g3.model, state, torch.tensor([t])) for t in (7, 9, 11)]
        for size in (1, 3, 5):
            start, chunk_state = 0, None
            while start < ids.shape[0]:
                end = g3.family.chunk_end(g3.model, row, min(start + size, ids.shape[0]))
                logits, chunk_state = g3.family.prefill_chunk(g3.model, row, start, end, chunk_state)
                start = end
            got = [logits] + [
                g3.family.decode_step(g3.model, chunk_state, torch.tensor([t])) for t in (7, 9, 11)
            ]
            for a, b in zip(got, ref, strict=True):
                assert torch.allclose(a, b, atol=ATOL), (size, (a - b).abs().max())
        _, part = g3.family.prefill_chunk(g3.model, row, 0, first_image)
        with pytest.raises(ValueError, match="splits an image"):
            g3.family.prefill_chunk(g3.model, row, first_image, first_image + 2, part)
