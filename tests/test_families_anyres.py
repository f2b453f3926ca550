"""LLaVA-NeXT (any-res tiles + image_newline, variable tokens per image) through the core's checks, via the
family interface (processor -> split_images -> encode_images -> prefill/decode_step): prefix-KV == the
per-layer overwrite reference applied to every tile; no bundle == the HF model; a mixed batch of 4 bundles +
a no-bundle row (images of different sizes, so different token counts) == each alone; gradients reach prompts
and projector only. The tiny checkpoint keeps llava-v1.6-mistral's config shape (training/tiny.py)."""

from __future__ import annotations

import pytest
import torch
from prompt_helpers import strong_prompts
from test_core_equivalence import reference_features, reference_lm_logits

from m2pt.forward import RowInput

# Logits here reach |7| (text init std 0.2, prompts x40, 3 tiles per image): with visual prompts the fp32
# summation order of the prefix-SDPA vs the plain concat shows up to 1.24e-5 (measured; without visual
# prompts: 0.0).
ATOL = 2e-5
RTOL = 0.0
SIZES = [(16, 40), (30, 20), (16, 16), (48, 20), (25, 60), (40, 40)]  # (width, height): different grids
WORDS = ["what", "is", "this", "digit", "?"]


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    from m2pt.loading import load_frozen_llava
    from training.tiny import build_tiny_llava, next_cfg

    path = build_tiny_llava(tmp_path_factory.mktemp("next"), next_cfg())
    return load_frozen_llava(str(path), device="cpu", dtype="float32")


def picture(size, seed):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def encode(nxt, words, size, seed):
    text = "user : <image> " + " ".join(words) + " assistant :"
    enc = nxt.processor(images=[picture(size, seed)], text=text, return_tensors="pt")
    return enc, enc["input_ids"][0], nxt.family.split_images(enc)


def ours(nxt, ids, images, prefix, all_logits=True):
    feats = nxt.family.encode_images(nxt.model, images, [prefix] * len(images))
    return nxt.family.prefill(
        nxt.model, [RowInput(ids, torch.cat(feats), prefix, images)], all_logits=all_logits
    )


def reference(nxt, ids, images, prompts):
    """The overwrite reference on every tile, then HF's own packing (unpad + image_newline)."""
    from m2pt.families.llava_next import tiles_of

    tiles = tiles_of(nxt.model, images[0])
    feats = reference_features(nxt, tiles, prompts)  # [tiles, N, D]
    packed, _ = nxt.model.model.pack_image_features(
        [feats], images[0].extras["image_sizes"][None], "default", image_newline=nxt.model.model.image_newline
    )
    return reference_lm_logits(nxt, ids, packed[0], prompts)


def test_token_count_varies_with_image_size_and_matches_the_processor(nxt):
    counts = set()
    for i, size in enumerate(SIZES):
        _, ids, images = encode(nxt, WORDS, size, i)
        feats = nxt.family.encode_images(nxt.model, images, [None])
        assert feats[0].shape[0] == int((ids == nxt.spec.image_token_id).sum())
        counts.add(feats[0].shape[0])
    assert len(counts) >= 3, counts


@pytest.mark.parametrize(
    "text_len,visual_len,projector", [(3, 2, True), (0, 3, False), (4, 0, False), (2, 2, True)]
)
def test_prefix_kv_equals_overwrite_reference_on_every_tile(nxt, text_len, visual_len, projector):
    prompts = strong_prompts(nxt, text_len, visual_len, projector, seed=text_len * 10 + visual_len)
    _, ids, images = encode(nxt, WORDS, (30, 20), 1)
    assert images[0].extras["image_sizes"].tolist() == [20, 30]
    with torch.no_grad():
        prefix = nxt.family.compute_prefix(nxt.model, prompts)
        got = ours(nxt, ids, images, prefix)[0][0]
        ref = reference(nxt, ids, images, prompts)
        base = reference(nxt, ids, images, None)
    assert torch.allclose(got, ref, rtol=RTOL, atol=ATOL), (got - ref).abs().max()
    assert (ref - base).abs().max() > 1e-2


def test_no_bundle_equals_unmodified_hf_model(nxt):
    for i, size in enumerate(SIZES[:3]):
        enc, ids, images = encode(nxt, WORDS[: i + 2], size, 20 + i)
        with torch.no_grad():
            hf = nxt.model(**enc).logits[0]
            got = ours(nxt, ids, images, None)[0][0]
        assert torch.allclose(got, hf, rtol=RTOL, atol=ATOL), (size, (got - hf).abs().max())


def greedy(nxt, rows, steps):
    """rows: (ids, images, prefix); one batch. Returns logits [B, steps+1, V] and tokens [B, steps]."""
    images = [im for _, ims, _ in rows for im in ims]
    prefixes = [pre for _, ims, pre in rows for _ in ims]
    feats = nxt.family.encode_images(nxt.model, images, prefixes)
    batch = [RowInput(ids, feats[i], pre, ims) for i, (ids, ims, pre) in enumerate(rows)]
    logits, state = nxt.family.prefill(nxt.model, batch)
    out, tokens = [logits], []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = nxt.family.decode_step(nxt.model, state, tokens[-1])
        out.append(logits)
    return torch.stack(out, dim=1), torch.stack(tokens, dim=1)


def test_mixed_batch_of_four_bundles_and_none_equals_each_alone(nxt):
    variants = [(3, 2, True), (0, 3, False), (4, 1, True), (2, 2, False)]
    prefixes = [
        nxt.family.compute_prefix(nxt.model, strong_prompts(nxt, *v, seed=i)) for i, v in enumerate(variants)
    ]
    prefixes.append(None)
    rows = []
    for i, prefix in enumerate(prefixes):
        _, ids, images = encode(nxt, WORDS[: 1 + i], SIZES[i], 40 + i)
        rows.append((ids, images, prefix))
    with torch.no_grad():
        alone = [greedy(nxt, [row], 6) for row in rows]
        mixed_logits, mixed_tokens = greedy(nxt, rows, 6)
    assert len({tuple(t[0].tolist()) for _, t in alone}) > 1, "bundles should lead to different generations"
    for b, (logits, tokens) in enumerate(alone):
        assert torch.allclose(mixed_logits[b], logits[0], rtol=RTOL, atol=ATOL), (
            b,
            (mixed_logits[b] - logits[0]).abs().max(),
        )
        assert torch.equal(mixed_tokens[b], tokens[0])


def test_gradients_reach_prompts_and_projector_only(nxt):
    model = nxt.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = strong_prompts(nxt, 3, 2, True, seed=7)
    params = prompts.parameters()
    for p in params:
        p.requires_grad_(True)
    _, ids, images = encode(nxt, WORDS, (48, 20), 3)
    logits, _ = ours(nxt, ids, images, nxt.family.compute_prefix(model, prompts))
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
