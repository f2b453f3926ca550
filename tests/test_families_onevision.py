"""LLaVA-OneVision (SigLIP + Qwen2, any-res tiles + image_newline + `anyres_max_9` pooling, variable tokens per
image) through the core's checks, via the family interface (processor -> split_images -> encode_images ->
prefill/decode_step): prefix-KV == the per-layer overwrite reference applied to every tile; no bundle == the HF
model (logits and greedy `generate`); a mixed batch of 4 bundles + a no-bundle row (images of different sizes,
one large enough to be pooled) == each alone; gradients reach prompts and projector only; `m2pt train` parity.
The processor is built without torchvision (image processor + tokenizer) and refuses videos. The tiny
checkpoint keeps llava-onevision-qwen2-0.5b-ov's config shape (training/tiny.py `onevision_cfg`)."""

from __future__ import annotations

import copy

import pytest
import torch
from prompt_helpers import strong_prompts
from test_core_equivalence import reference_features, reference_lm_logits

from m2pt.forward import RowInput

ATOL = 1e-5
RTOL = 1e-5  # the core suite's tolerance (tests/test_core_equivalence.py): |logits| reach ~7 here
# (width, height): different grids; (96, 96) is a 6 x 6 grid whose 24 x 24 features exceed 9 tiles' worth, so
# OneVision's anyres_max_9 pooling runs; (100, 30) is a wide grid, unpadded
SIZES = [(30, 20), (16, 16), (96, 96), (100, 30), (25, 60), (40, 40)]
WORDS = ["what", "is", "this", "digit", "?"]


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    from m2pt.loading import load_frozen_llava
    from training.tiny import build_tiny_llava, onevision_cfg

    path = build_tiny_llava(tmp_path_factory.mktemp("onevision"), onevision_cfg())
    return load_frozen_llava(str(path), device="cpu", dtype="float32")


def picture(size, seed):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def encode(ov, words, size, seed):
    text = "user : <image> " + " ".join(words) + " assistant :"
    enc = ov.processor(images=[picture(size, seed)], text=text, return_tensors="pt")
    return enc, enc["input_ids"][0], ov.family.split_images(enc)


def ours(ov, ids, images, prefix, all_logits=True):
    feats = ov.family.encode_images(ov.model, images, [prefix] * len(images))
    return ov.family.prefill(
        ov.model, [RowInput(ids, torch.cat(feats), prefix, images)], all_logits=all_logits
    )


def reference(ov, ids, images, prompts):
    """The overwrite reference on every tile, then HF's own OneVision packing (unpad, pool, image_newline)."""
    from m2pt.families.llava_onevision import onevision_tiles

    packed = []
    for image in images:
        feats = reference_features(ov, onevision_tiles(ov.model, image), prompts)  # [tiles, N, D]
        out, _ = ov.model.model.pack_image_features(
            [feats],
            image.extras["image_sizes"][None],
            image_newline=ov.model.model.image_newline,
            vision_aspect_ratio=ov.model.config.vision_aspect_ratio,
        )
        packed.append(out[0])
    return reference_lm_logits(ov, ids, torch.cat(packed), prompts)


def test_processor_is_image_only_and_refuses_videos(ov):
    assert type(ov.processor).__name__ == "ImageOnlyLlavaOnevisionProcessor"
    assert ov.processor.video_processor is None
    with pytest.raises(ValueError, match="videos are not supported for LLaVA-OneVision"):
        ov.processor(videos=[picture((16, 16), 0)], text="user : <video> what", return_tensors="pt")


def test_processor_settings_come_from_processor_config_else_model_config(ov, tmp_path):
    """The tiny checkpoint's processor_config.json has no placeholder settings: they come from config.json
    (tile 16 / patch 4 -> 16 tokens per tile). A checkpoint that saved them (as the HF ones do) wins."""
    import json
    import shutil

    from m2pt.families.llava_onevision_processor import load_processor

    assert ov.processor.num_image_tokens == 16 and ov.processor.vision_feature_select_strategy == "full"
    assert ov.processor.vision_aspect_ratio == "anyres_max_9"
    path = shutil.copytree(ov.model.name_or_path, tmp_path / "m")
    saved = json.loads((path / "processor_config.json").read_text())
    saved.update(num_image_tokens=9, vision_aspect_ratio="anyres_max_4")
    (path / "processor_config.json").write_text(json.dumps(saved))
    processor = load_processor(str(path))
    assert processor.num_image_tokens == 9 and processor.vision_aspect_ratio == "anyres_max_4"


def test_token_count_varies_with_image_size_pools_and_matches_the_processor(ov):
    counts = set()
    for i, size in enumerate(SIZES):
        _, ids, images = encode(ov, WORDS, size, i)
        feats = ov.family.encode_images(ov.model, images, [None])
        assert feats[0].shape[0] == int((ids == ov.spec.image_token_id).sum())
        counts.add(feats[0].shape[0])
    assert len(counts) >= 5, counts
    _, ids, images = encode(ov, WORDS, (96, 96), 0)
    unpooled = 16 + 24 * 25  # base tile + 24 rows of 24 features + newline, had no pooling run
    assert images[0].pixel_values.shape[0] == 37 and int((ids == ov.spec.image_token_id).sum()) < unpooled


@pytest.mark.parametrize(
    "text_len,visual_len,projector", [(3, 2, True), (0, 3, False), (4, 0, False), (2, 2, True)]
)
@pytest.mark.parametrize("size", [(30, 20), (96, 96)])
def test_prefix_kv_equals_overwrite_reference_on_every_tile(ov, text_len, visual_len, projector, size):
    prompts = strong_prompts(ov, text_len, visual_len, projector, seed=text_len * 10 + visual_len)
    _, ids, images = encode(ov, WORDS, size, 1)
    assert images[0].extras["image_sizes"].tolist() == [size[1], size[0]]
    with torch.no_grad():
        prefix = ov.family.compute_prefix(ov.model, prompts)
        got = ours(ov, ids, images, prefix)[0][0]
        ref = reference(ov, ids, images, prompts)
        base = reference(ov, ids, images, None)
    assert torch.allclose(got, ref, rtol=RTOL, atol=ATOL), (got - ref).abs().max()
    assert (ref - base).abs().max() > 1e-2


def test_no_bundle_equals_unmodified_hf_model(ov):
    for i, size in enumerate(SIZES[:4]):
        enc, ids, images = encode(ov, WORDS[: i + 2], size, 20 + i)
        with torch.no_grad():
            hf = ov.model(**enc).logits[0]
            got = ours(ov, ids, images, None)[0][0]
        assert torch.allclose(got, hf, rtol=RTOL, atol=ATOL), (size, (got - hf).abs().max())


def test_multi_image_sample_uses_base_tiles_like_hf(ov):
    """A nested image list (one sample, 2 images): HF encodes each image by its base tile only."""
    images = [picture((30, 20), 5), picture((96, 96), 6)]
    enc = ov.processor(images=[images], text="user : <image> <image> what assistant :", return_tensors="pt")
    split = ov.family.split_images(enc)
    assert [bool(im.extras["tiled"]) for im in split] == [False, False]
    ids = enc["input_ids"][0]
    with torch.no_grad():
        hf = ov.model(**enc).logits[0]
        got = ours(ov, ids, split, None)[0][0]
    assert int((ids == ov.spec.image_token_id).sum()) == 2 * (16 + 1)
    assert torch.allclose(got, hf, rtol=RTOL, atol=ATOL), (got - hf).abs().max()


def greedy(ov, rows, steps):
    """rows: (ids, images, prefix); one batch. Returns logits [B, steps+1, V] and tokens [B, steps]."""
    images = [im for _, ims, _ in rows for im in ims]
    prefixes = [pre for _, ims, pre in rows for _ in ims]
    feats = ov.family.encode_images(ov.model, images, prefixes)
    batch = [RowInput(ids, feats[i], pre, ims) for i, (ids, ims, pre) in enumerate(rows)]
    logits, state = ov.family.prefill(ov.model, batch)
    out, tokens = [logits], []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = ov.family.decode_step(ov.model, state, tokens[-1])
        out.append(logits)
    return torch.stack(out, dim=1), torch.stack(tokens, dim=1)


def test_no_bundle_greedy_equals_hf_generate(ov):
    for i, size in enumerate(SIZES[:3]):
        enc, ids, images = encode(ov, WORDS[: i + 2], size, 30 + i)
        config = copy.deepcopy(ov.model.generation_config)
        config.eos_token_id, config.max_new_tokens, config.do_sample = None, 8, False
        with torch.no_grad():
            want = ov.model.generate(**enc, generation_config=config)[0, ids.shape[0] :]
            _, got = greedy(ov, [(ids, images, None)], 8)
        assert torch.equal(got[0], want), (size, got[0].tolist(), want.tolist())


def test_mixed_batch_of_four_bundles_and_none_equals_each_alone(ov):
    variants = [(3, 2, True), (0, 3, False), (4, 1, True), (2, 2, False)]
    prefixes = [
        ov.family.compute_prefix(ov.model, strong_prompts(ov, *v, seed=i)) for i, v in enumerate(variants)
    ]
    prefixes.append(None)
    rows = []
    for i, prefix in enumerate(prefixes):
        _, ids, images = encode(ov, WORDS[: 1 + i], SIZES[i], 40 + i)
        rows.append((ids, images, prefix))
    with torch.no_grad():
        alone = [greedy(ov, [row], 6) for row in rows]
        mixed_logits, mixed_tokens = greedy(ov, rows, 6)
    assert len({tuple(t[0].tolist()) for _, t in alone}) > 1, "bundles should lead to different generations"
    for b, (logits, tokens) in enumerate(alone):
        assert torch.allclose(mixed_logits[b], logits[0], rtol=RTOL, atol=ATOL), (
            b,
            (mixed_logits[b] - logits[0]).abs().max(),
        )
        assert torch.equal(mixed_tokens[b], tokens[0])


def test_gradients_reach_prompts_and_projector_only(ov):
    model = ov.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = strong_prompts(ov, 3, 2, True, seed=7)
    params = prompts.parameters()
    for p in params:
        p.requires_grad_(True)
    _, ids, images = encode(ov, WORDS, (96, 96), 3)
    logits, _ = ours(ov, ids, images, ov.family.compute_prefix(model, prompts))
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onevision_training_parity(ov, tmp_path):
    """`m2pt train`'s trainer on a OneVision base: the base stays bit-identical, and the exported bundle gives
    the training logits in the serving path."""
    from test_train_mechanics import config

    from prompts_store.format import load_bundle
    from training.data import DataOptions, collate, load_data
    from training.params import PromptModule
    from training.trainer import train

    before = {k: v.clone() for k, v in ov.model.state_dict().items()}
    result = train(config(tmp_path, steps=3), base=ov)
    assert all(torch.equal(before[k], v) for k, v in ov.model.state_dict().items())
    train_set, _ = load_data(
        DataOptions("digits", train_size=4, eval_size=1),
        ov.processor,
        ov.spec.image_size,
        ov.family.split_images,
    )
    batch = collate(train_set.examples)
    with torch.no_grad():
        training_logits = PromptModule(result.prompts, ov.model).logits(batch)
    loaded = load_bundle(result.bundle_dir, spec=ov.spec)
    with torch.inference_mode():
        prefix = ov.family.compute_prefix(ov.model, loaded.prompts)
        rows = []
        for b, ids in enumerate(batch.input_ids):
            ims = list(batch.images[b])
            feats = torch.cat(ov.family.encode_images(ov.model, ims, [prefix] * len(ims)))
            rows.append(RowInput(ids, feats, prefix, ims))
        serving, _ = ov.family.prefill(ov.model, rows, all_logits=True)
    assert (serving - training_logits).abs().max() <= 1e-5
