"""Qwen-VL through the startup gate and the bundle checks: the config-only spec equals the loaded one, a bundle for one
family is refused by the other, unsupported relatives (Qwen2-VL) and broken configs are refused before weights load,
and the bf16 path tracks fp32 on a mixed batch."""

from __future__ import annotations

import json

import pytest
import torch
from qwen_helpers import FAMILIES, load_tiny_qwen, make_row, strong_prompts

from m2pt.families.base import UnsupportedModelError
from m2pt.forward import RowInput
from m2pt.loading import load_frozen_llava, spec_from_checkpoint


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return {family: load_tiny_qwen(tmp_path_factory, family) for family in FAMILIES}


def test_config_only_spec_equals_the_loaded_spec(both):
    for path, frozen in both.values():
        spec = spec_from_checkpoint(str(path))
        assert spec.fingerprint() == frozen.spec.fingerprint() and spec == frozen.spec
    assert both["qwen2_5_vl"][1].spec.fingerprint() != both["qwen3_vl"][1].spec.fingerprint()


def test_a_bundle_for_one_family_is_refused_by_the_other(both, tmp_path):
    from prompts_store.errors import BundleError
    from prompts_store.format import load_bundle, save_bundle

    _, qwen25 = both["qwen2_5_vl"]
    save_bundle(tmp_path / "b", strong_prompts(qwen25, 2, 2, True, seed=0), qwen25.spec, "b", provenance={})
    assert load_bundle(tmp_path / "b", spec=qwen25.spec).manifest.name == "b"
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(tmp_path / "b", spec=both["qwen3_vl"][1].spec)


def edit_config(path, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_qwen2_vl_is_refused_before_weights_load_with_what_is_supported(both, tmp_path):
    path, _ = both["qwen2_5_vl"]
    edited = edit_config(path, tmp_path, architectures=["Qwen2VLForConditionalGeneration"])
    (edited / "model.safetensors").write_bytes(b"not weights: the gate must not read them")
    with pytest.raises(UnsupportedModelError) as err:
        load_frozen_llava(str(edited), device="cpu", dtype="float32")
    message = str(err.value)
    assert "Qwen2VLForConditionalGeneration" in message and "not implemented" in message
    assert "Qwen2_5_VLForConditionalGeneration" in message and "Qwen3VLForConditionalGeneration" in message


def test_missing_merger_weights_are_refused(both, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = both["qwen3_vl"]
    edited = edit_config(path, tmp_path)
    weights = load_file(edited / "model.safetensors")
    kept = {k: v for k, v in weights.items() if ".merger." not in k}
    assert len(kept) < len(weights)
    save_file(kept, edited / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="missing keys: .*merger"):
        load_frozen_llava(str(edited), device="cpu", dtype="float32")


def test_bfloat16_mixed_batch_tracks_float32(both):
    for path, frozen in both.values():
        half = load_frozen_llava(str(path), device="cpu", dtype="bfloat16")
        prompts = strong_prompts(frozen, 3, 2, True, seed=1)
        rows = [
            make_row(frozen, "what is", size, seed=s)[:2] for s, size in enumerate([[(48, 64)], [(32, 32)]])
        ]
        out = {}
        for base in (frozen, half):
            with torch.inference_mode():
                prefix = base.family.compute_prefix(base.model, prompts)
                prefixes = [prefix, None]
                images = [ims[0] for _, ims in rows]
                feats = base.family.encode_images(base.model, images, prefixes)
                batch = [
                    RowInput(ids, feats[i], prefixes[i], tuple(ims)) for i, (ids, ims) in enumerate(rows)
                ]
                logits, _ = base.family.prefill(base.model, batch)
            out[base.dtype] = logits.float()
        assert half.model.dtype == torch.bfloat16
        # the std-0.2 tiny model's logits reach ~4 and bf16 keeps ~3 digits: bound the error relative to them
        scale = out[torch.float32].abs().max()
        assert (out[torch.bfloat16] - out[torch.float32]).abs().max() < 0.04 * scale
        assert torch.equal(out[torch.bfloat16].argmax(-1), out[torch.float32].argmax(-1))
