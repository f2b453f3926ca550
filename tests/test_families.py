"""Every supported family through the core's equivalence and training-parity checks, and the dead-ViT-layer
skip.

The checks are the ones of tests/test_core_equivalence.py and tests/test_train_mechanics.py, run on tiny
checkpoints that keep each family's real config shape (training/tiny.py):
- `siglip-qwen2`: llava-interleave-qwen (SigLIP without head, strategy full, layer -1, Qwen2 + bias + tied);
- `clip-layer-2`: LLaVA-1.5 (CLIP, strategy default, layer -2: the last ViT layer is dead);
- `clip-qwen3`: the LLaVA-1.5 recipe on a Qwen3 LLM (q/k-norm, GQA, tied embeddings);
- `siglip-multi-default`: SigLIP with layers [-3, -2] concatenated and strategy default (HF drops the first
  patch even without CLS; the core must do the same).
"""

from __future__ import annotations

import pytest
import torch
from prompt_helpers import strong_prompts
from test_core_equivalence import VARIANTS, make_row_tokens, ours_logits, reference_logits
from test_core_equivalence import test_gradients_reach_prompts_and_projector_only as gradients_check
from test_core_equivalence import test_mixed_batch_equals_each_row_alone as mixed_check
from test_core_equivalence import test_no_bundle_row_equals_unmodified_hf_model as hf_check
from test_train_mechanics import test_exported_bundle_gives_training_logits_in_serving_path as parity_check
from test_train_mechanics import test_only_prompts_and_projector_change as frozen_check

ATOL = 1e-5
FAMILY_CONFIGS = {
    "siglip-qwen2": {},
    "clip-layer-2": {
        "family": "llava",
        "vit_layers": 3,
        "vision_feature_layer": -2,
        "select_strategy": "default",
    },
    "clip-qwen3": {"family": "llava", "llm": "qwen3", "text_init_std": 0.2},
    "siglip-multi-default": {"vit_layers": 4, "vision_feature_layer": [-3, -2], "select_strategy": "default"},
}


def family_cfg(name: str):
    from training.tiny import TinyLlavaConfig, interleave_cfg

    overrides = FAMILY_CONFIGS[name]
    return TinyLlavaConfig(**overrides) if overrides.get("family") == "llava" else interleave_cfg(**overrides)


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def fam(request, tmp_path_factory):
    from m2pt.loading import load_frozen_llava
    from training.tiny import build_tiny_llava

    path = build_tiny_llava(tmp_path_factory.mktemp(request.param), family_cfg(request.param))
    return load_frozen_llava(str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("text_len,visual_len,projector", VARIANTS)
def test_prefix_kv_equals_official_overwrite(fam, text_len, visual_len, projector):
    prompts = strong_prompts(fam, text_len, visual_len, projector, seed=text_len * 10 + visual_len)
    ids, pixels = make_row_tokens(fam, ["what", "is", "this", "digit", "?"], seed=1)
    with torch.no_grad():
        ref = reference_logits(fam, ids, pixels, prompts)
        ours = ours_logits(fam, ids, pixels, prompts)
        base = reference_logits(fam, ids, pixels, None)
    assert torch.allclose(ours, ref, atol=ATOL), (ours - ref).abs().max()
    assert (ref - base).abs().max() > 1e-2, (
        "the prompts must change the output for this test to mean anything"
    )


def test_visual_prompts_alone_change_the_output(fam):
    """Visual prompts must reach the tower's attention (SigLIP's attention drops extra kwargs)."""
    prompts = strong_prompts(fam, 0, 3, False, seed=5)
    ids, pixels = make_row_tokens(fam, ["what", "digit", "?"], seed=4)
    with torch.no_grad():
        assert (
            ours_logits(fam, ids, pixels, prompts) - ours_logits(fam, ids, pixels, None)
        ).abs().max() > 1e-2


def test_no_bundle_row_equals_unmodified_hf_model(fam):
    hf_check(fam)


def test_mixed_batch_of_five_bundles_and_none_equals_each_alone(fam):
    mixed_check(fam)


def test_gradients_reach_prompts_and_projector_only(fam):
    gradients_check(fam)


def test_training_steps_change_only_prompts_and_projector(fam, tmp_path):
    frozen_check(fam, tmp_path)


def test_trained_bundle_gives_training_logits_in_serving_path(fam, tmp_path):
    parity_check(fam, tmp_path)


def test_image_token_count_matches_the_processor(fam):
    """The spec's count (no CLS for SigLIP) is what the processor expands `<image>` to and what the tower
    gives."""
    from m2pt.gate import blank_image

    enc = fam.processor(images=[blank_image(fam.spec.image_size)], text="<image>", return_tensors="pt")
    placeholders = int((enc["input_ids"] == fam.spec.image_token_id).sum())
    features = fam.family.encode_images(fam.model, fam.family.split_images(enc), [None])
    assert placeholders == fam.spec.num_image_tokens == features[0].shape[0]


def test_layers_past_the_selected_one_are_not_run(fam):
    """Issue 8 item 4: ViT layers after the deepest `vision_feature_layer` never run, in serving and training,
    the bundle has no prompt rows for them, and the output equals HF's (which runs every layer)."""
    from m2pt.forward import vision_layers_used

    layers = fam.model.model.vision_tower.encoder.layers
    used = vision_layers_used(fam.model.config)
    calls = [0] * len(layers)
    hooks = [
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    prompts = strong_prompts(fam, 2, 2, True, seed=3)
    assert prompts.visual.shape[0] == fam.spec.vit_layers == used
    ids, pixels = make_row_tokens(fam, ["what", "is", "this"], seed=6)
    try:
        with torch.no_grad():
            ours = ours_logits(fam, ids, pixels, prompts)
        run_by_core = list(calls)
        with torch.no_grad():
            ref = reference_logits(fam, ids, pixels, prompts)  # runs every layer
    finally:
        for hook in hooks:
            hook.remove()
    assert run_by_core == [1] * used + [0] * (len(layers) - used)
    assert calls == [2] * used + [1] * (len(layers) - used)
    assert torch.allclose(ours, ref, atol=ATOL), (ours - ref).abs().max()
