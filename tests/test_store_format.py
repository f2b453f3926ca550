"""Bundle format v1: save -> load round trips, manifest contents, content hash semantics, save-time
refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from store_helpers import craft, read_files, rehash, tiny_prompts, write_raw

from prompts_store.errors import BundleFileSetError, BundleNonFiniteError, BundleShapeError
from prompts_store.format import load_bundle, read_manifest, save_bundle, validate_upload
from prompts_store.limits import BundleLimits


def _assert_same(a, b):
    assert torch.equal(a.text, b.text) and torch.equal(a.visual, b.visual)
    assert (a.projector is None) == (b.projector is None)
    for k in a.projector or {}:
        assert torch.equal(a.projector[k], b.projector[k])


def test_round_trip_with_projector(tiny, tmp_path):
    prompts = tiny_prompts(tiny, seed=1)
    out = save_bundle(
        tmp_path / "b",
        prompts,
        tiny.spec,
        "colors",
        provenance={"dataset": "shapes", "steps": 7, "metrics": {"acc": 0.93}},
    )
    assert sorted(os.listdir(out)) == ["manifest.json", "tensors.safetensors"]
    loaded = load_bundle(out, tiny.spec)
    _assert_same(loaded.prompts, prompts)
    assert loaded.prompts.text.dtype == torch.float32 and loaded.prompts.text.device.type == "cpu"
    assert loaded.nbytes == 4 * prompts.num_parameters()
    m = loaded.manifest
    assert (m.format_version, m.name, m.version, m.label) == (1, "colors", None, "colors")
    assert m.base_model.fingerprint == tiny.spec.fingerprint()
    assert m.base_model.spec == tiny.spec.to_json()
    assert (m.text_prompts, m.visual_prompts, m.has_projector, m.dtype) == (3, 2, True, "float32")
    assert m.tensors["text_prompts"].shape == [tiny.spec.llm_layers, 3, tiny.spec.llm_dim]
    assert set(m.tensors) == {"text_prompts", "visual_prompts"} | {
        f"projector.{k}" for k in tiny.spec.projector_shapes
    }
    assert m.provenance == {"dataset": "shapes", "steps": 7, "metrics": {"acc": 0.93}}
    assert loaded.content_hash == m.content_hash and m.content_hash.startswith("sha256:")
    assert read_manifest(out) == m


def test_round_trip_text_only_and_visual_only(tiny, tmp_path):
    for i, (t, v) in enumerate([(4, 0), (0, 5)]):
        prompts = tiny_prompts(tiny, seed=i, text_len=t, visual_len=v, projector=False)
        loaded = load_bundle(save_bundle(tmp_path / f"b{i}", prompts, tiny.spec, "part"), tiny.spec)
        assert loaded.prompts.text_len == t and loaded.prompts.visual_len == v
        assert loaded.prompts.projector is None and loaded.manifest.has_projector is False


def test_half_precision_bundle_loads_as_float32(tiny, tmp_path):
    good = save_bundle(tmp_path / "good", tiny_prompts(tiny, projector=False), tiny.spec, "half")
    flat = {k: v.to(torch.float16) for k, v in load_bundle(good).prompts.to_flat().items()}
    half = craft(tmp_path / "half", good, flat, dtype="float16")
    loaded = load_bundle(half, tiny.spec)
    assert loaded.prompts.text.dtype == torch.float32
    assert torch.equal(loaded.prompts.text, flat["text_prompts"].float())


def test_content_hash_depends_on_content_only(tiny, tmp_path):
    prompts = tiny_prompts(tiny, seed=3)
    a = load_bundle(save_bundle(tmp_path / "a", prompts, tiny.spec, "alpha", provenance={"steps": 1}))
    b = load_bundle(
        save_bundle(tmp_path / "b", prompts, tiny.spec, "beta", version="v9", provenance={"steps": 2})
    )
    c = load_bundle(save_bundle(tmp_path / "c", tiny_prompts(tiny, seed=4), tiny.spec, "alpha"))
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash


def test_upload_in_memory_equals_directory_load(tiny, tmp_path):
    out = save_bundle(tmp_path / "b", tiny_prompts(tiny), tiny.spec, "mem")
    from_dir = load_bundle(out, tiny.spec)
    from_mem = validate_upload(
        (out / "manifest.json").read_bytes(),
        (out / "tensors.safetensors").read_bytes(),
        tiny.spec,
        BundleLimits(),
    )
    assert from_mem.content_hash == from_dir.content_hash
    _assert_same(from_mem.prompts, from_dir.prompts)


def test_save_replaces_a_previous_bundle_whole(tiny, tmp_path):
    out = tmp_path / "b"
    save_bundle(out, tiny_prompts(tiny, seed=1), tiny.spec, "same")
    second = tiny_prompts(tiny, seed=2)
    save_bundle(out, second, tiny.spec, "same")
    _assert_same(load_bundle(out, tiny.spec).prompts, second)
    assert sorted(os.listdir(tmp_path)) == ["b"]  # no temp or trash left


def test_save_refuses_a_foreign_directory_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "readme.txt").write_text("mine")
    with pytest.raises(BundleFileSetError, match="choose a new directory"):
        save_bundle(out, tiny_prompts(tiny), tiny.spec, "x")
    assert os.listdir(out) == ["readme.txt"] and sorted(os.listdir(tmp_path)) == ["notes"]


def test_save_refuses_prompts_that_do_not_fit_the_model(tiny, tmp_path):
    prompts = tiny_prompts(tiny, projector=False)
    prompts.text = torch.zeros(tiny.spec.llm_layers, 3, tiny.spec.llm_dim + 1)
    with pytest.raises(BundleShapeError, match=r"needs \[2, 3, 64\]"):
        save_bundle(tmp_path / "b", prompts, tiny.spec, "x")
    prompts = tiny_prompts(tiny, projector=False)
    prompts.visual[0, 0, 0] = float("nan")
    with pytest.raises(BundleNonFiniteError, match="NaN/Inf"):
        save_bundle(tmp_path / "b", prompts, tiny.spec, "x")
    assert not (tmp_path / "b").exists() and os.listdir(tmp_path) == []


def test_manifest_records_tensor_sha256_of_raw_bytes(tiny, tmp_path):
    import hashlib

    out = save_bundle(tmp_path / "b", tiny_prompts(tiny, projector=False), tiny.spec, "h")
    manifest, _ = read_files(out)
    text = load_bundle(out).prompts.text
    assert manifest["tensors"]["text_prompts"]["sha256"] == hashlib.sha256(text.numpy().tobytes()).hexdigest()


def test_helpers_craft_valid_bundles(tiny, tmp_path):
    """The crafting helper used by the bad-input tests produces loadable bundles when given good tensors."""
    good = save_bundle(tmp_path / "good", tiny_prompts(tiny, projector=False), tiny.spec, "g")
    manifest, tensor_bytes = read_files(good)
    same = write_raw(tmp_path / "same", rehash(manifest, tensor_bytes), tensor_bytes)
    assert load_bundle(same, tiny.spec).content_hash == load_bundle(good).content_hash
    assert json.loads((same / "manifest.json").read_text())["tensors"] == manifest["tensors"]
    crafted = craft(tmp_path / "c", good, load_bundle(good).prompts.to_flat())
    assert load_bundle(crafted, tiny.spec).content_hash == load_bundle(good).content_hash
