"""Every bad bundle is refused with its own error type and a message saying how to fix it, by
`load_bundle`, by `validate_upload` and by the store (which must then be byte-for-byte unchanged: nothing
partly written)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from store_helpers import craft, other_spec, read_files, tiny_prompts, tree, write_raw

from prompts_store import errors as E
from prompts_store.format import load_bundle, save_bundle, validate_upload
from prompts_store.limits import BundleLimits
from prompts_store.store import BundleStore


class _Canary:
    """Unpickling this would create the canary file: proof that nothing ever unpickles a bundle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _flat(good: Path) -> dict[str, torch.Tensor]:
    return load_bundle(good).prompts.to_flat()


def _with(good: Path, out: Path, **changes) -> Path:
    manifest, tensor_bytes = read_files(good)
    manifest.update(changes)
    return write_raw(out, manifest, tensor_bytes)


def _tensor_bytes(good: Path, out: Path, data: bytes) -> Path:
    manifest, _ = read_files(good)
    return write_raw(out, manifest, data)


def _poison(value: float):
    def build(good, out, tiny):
        flat = _flat(good)
        flat["visual_prompts"][1, 0, 3] = value
        return craft(out, good, flat)

    return build


def _modified(key: str, fn):
    def build(good, out, tiny):
        flat = _flat(good)
        flat[key] = fn(flat[key])
        return craft(out, good, flat)

    return build


def _missing(good, out, tiny):
    shutil.copytree(good, out)
    os.remove(out / "tensors.safetensors")
    return out


def _extra(good, out, tiny):
    shutil.copytree(good, out)
    (out / "notes.txt").write_text("hi")
    return out


def _symlinked(good, out, tiny):
    out.mkdir()
    shutil.copy(good / "manifest.json", out)
    os.symlink(good / "tensors.safetensors", out / "tensors.safetensors")
    return out


def _huge_header(good, out, tiny):
    n = 2 * 1024 * 1024
    return _tensor_bytes(good, out, n.to_bytes(8, "little") + b"{" + b" " * (n - 2) + b"}")


def _flip_byte(good, out, tiny):
    manifest, data = read_files(good)
    data = bytearray(data)
    data[-3] ^= 0x01
    return write_raw(out, manifest, bytes(data))


def _other_model(good, out, tiny):
    spec = other_spec(tiny.spec)
    prompts = tiny_prompts(tiny, projector=False)
    prompts.text = torch.zeros(spec.llm_layers, 3, spec.llm_dim)
    return save_bundle(out, prompts, spec, "foreign")


def _deep(good, out, tiny):
    nested: dict = {}
    for _ in range(40):
        nested = {"a": nested}
    return _with(good, out, provenance=nested)


def _without(key):
    def build(good, out, tiny):
        manifest, data = read_files(good)
        del manifest[key]
        return write_raw(out, manifest, data)

    return build


# id -> (builder(good, out, tiny) -> dir, error type, message regex, limits)
CASES = {
    "missing_file": (_missing, E.BundleFileSetError, r"missing: \['tensors.safetensors'\].*re-export", None),
    "extra_file": (_extra, E.BundleFileSetError, r"unexpected: \['notes.txt'\]", None),
    "symlinked_file": (
        _symlinked,
        E.BundleFileSetError,
        r"not regular files: \['tensors.safetensors'\]",
        None,
    ),
    "manifest_not_json": (
        lambda g, o, t: write_raw(o, b"{'name': 1", read_files(g)[1]),
        E.BundleManifestError,
        r"not valid UTF-8 JSON",
        None,
    ),
    "manifest_huge": (
        lambda g, o, t: _with(g, o, provenance={"log": "x" * 100_000}),
        E.BundleManifestError,
        r"over the 65536-byte cap",
        None,
    ),
    "manifest_deep": (_deep, E.BundleManifestError, r"nests deeper than 16 levels", None),
    "manifest_missing_field": (
        _without("tensors"),
        E.BundleManifestError,
        r"tensors: Field required.*re-export",
        None,
    ),
    "manifest_unknown_field": (
        lambda g, o, t: _with(g, o, extra=1),
        E.BundleManifestError,
        r"extra: Extra inputs",
        None,
    ),
    "manifest_bad_name": (
        lambda g, o, t: _with(g, o, name="../x"),
        E.BundleNameError,
        r"invalid manifest name",
        None,
    ),
    "format_version": (
        lambda g, o, t: _with(g, o, format_version=2),
        E.BundleFormatVersionError,
        r"format_version is 2; .* reads format_version 1",
        None,
    ),
    "other_fingerprint": (
        _other_model,
        E.BundleFingerprintError,
        r"'other-llava'.*llm_dim 128 vs 64.*train and export",
        None,
    ),
    "pickle_renamed": (None, E.BundleNotSafetensorsError, r"header length field says .*pickle", None),
    "truncated": (
        lambda g, o, t: _tensor_bytes(g, o, read_files(g)[1][:-10]),
        E.BundleNotSafetensorsError,
        r"truncated data",
        None,
    ),
    "truncated_to_nothing": (
        lambda g, o, t: _tensor_bytes(g, o, b"\x10\x00"),
        E.BundleNotSafetensorsError,
        r"too short",
        None,
    ),
    "oversized_header": (
        _huge_header,
        E.BundleNotSafetensorsError,
        r"2097152 bytes, over the 1048576-byte cap",
        None,
    ),
    "header_length_2_pow_63": (
        lambda g, o, t: _tensor_bytes(g, o, (1 << 63).to_bytes(8, "little") + b"{}"),
        E.BundleNotSafetensorsError,
        r"over the",
        None,
    ),
    "header_not_json": (
        lambda g, o, t: _tensor_bytes(g, o, (4).to_bytes(8, "little") + b"\xff\xfe{}"),
        E.BundleNotSafetensorsError,
        r"not UTF-8 JSON",
        None,
    ),
    "trailing_bytes": (
        lambda g, o, t: _tensor_bytes(g, o, read_files(g)[1] + b"junk"),
        E.BundleNotSafetensorsError,
        r"trailing bytes",
        None,
    ),
    "wrong_shape": (
        _modified("text_prompts", lambda t: torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 1)),
        E.BundleShapeError,
        r"needs \[2, 3, 64\]",
        None,
    ),
    "unexpected_tensor": (
        lambda g, o, t: craft(o, g, {**_flat(g), "evil": torch.zeros(2)}),
        E.BundleShapeError,
        r"unexpected tensors \['evil'\]",
        None,
    ),
    "wrong_dtype": (
        lambda g, o, t: craft(o, g, {k: v.double() for k, v in _flat(g).items()}, dtype="float64"),
        E.BundleDtypeError,
        r"'float64' is not supported",
        None,
    ),
    "dtype_disagrees_with_manifest": (
        lambda g, o, t: craft(o, g, {k: v.half() for k, v in _flat(g).items()}),
        E.BundleDtypeError,
        r"is F16 in the file",
        None,
    ),
    "token_limit": (
        lambda g, o, t: shutil.copytree(g, o),
        E.BundleTokenLimitError,
        r"3 text prompt tokens.*at most 2",
        BundleLimits(max_text_tokens=2),
    ),
    "nan": (
        _poison(float("nan")),
        E.BundleNonFiniteError,
        r"'visual_prompts' holds 1 NaN/Inf.*retrain",
        None,
    ),
    "inf": (_poison(float("-inf")), E.BundleNonFiniteError, r"'visual_prompts' holds 1 NaN/Inf", None),
    "huge_magnitude": (_poison(1e30), E.BundleNonFiniteError, r"magnitude 1e\+30, over the cap", None),
    "tensor_hash": (_flip_byte, E.BundleHashError, r"has sha256 .* the manifest says", None),
    "content_hash_edited": (
        lambda g, o, t: _with(g, o, content_hash="sha256:" + "0" * 64),
        E.BundleHashError,
        r"content_hash .* does not match",
        None,
    ),
    "size_cap": (
        lambda g, o, t: shutil.copytree(g, o),
        E.BundleTooLargeError,
        r"over the 2000-byte cap",
        BundleLimits(max_bytes=2000),
    ),
}


@pytest.fixture(scope="module")
def good_dir(tiny, tmp_path_factory):
    return save_bundle(
        tmp_path_factory.mktemp("good") / "good", tiny_prompts(tiny, projector=False), tiny.spec, "good"
    )


def _build(case: str, good: Path, tmp_path: Path, tiny) -> tuple[Path, BundleLimits]:
    builder, _, _, limits = CASES[case]
    out = tmp_path / "bad"
    if case == "pickle_renamed":
        payload = pickle.dumps({"text_prompts": _Canary(str(tmp_path / "canary"))})
        _tensor_bytes(good, out, payload)
    else:
        builder(good, out, tiny)
    return out, limits or BundleLimits()


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_refuses(case, good_dir, tmp_path, tiny):
    bad, limits = _build(case, good_dir, tmp_path, tiny)
    _, error, message, _ = CASES[case]
    with pytest.raises(E.BundleError) as info:
        load_bundle(bad, tiny.spec, limits)
    assert type(info.value) is error, f"{case}: got {type(info.value).__name__}: {info.value}"
    assert info.value.status in (400, 413, 422)
    assert re.search(message, str(info.value)), str(info.value)
    assert not (tmp_path / "canary").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_store_refuses_and_writes_nothing(case, good_dir, tmp_path, tiny):
    store = BundleStore(tmp_path / "store")
    store.publish(good_dir, name="keep", spec=tiny.spec)
    before = tree(store.root)
    bad, limits = _build(case, good_dir, tmp_path, tiny)
    _, error, _, _ = CASES[case]
    with pytest.raises(error):
        store.publish(bad, name="victim", spec=tiny.spec, limits=limits)
    if error is not E.BundleFileSetError:  # the upload path gets the same bytes (it has no file set to check)
        with pytest.raises(error):
            store.publish_files(
                (bad / "manifest.json").read_bytes(),
                (bad / "tensors.safetensors").read_bytes(),
                tiny.spec,
                limits,
            )
        with pytest.raises(error):
            validate_upload(
                (bad / "manifest.json").read_bytes(),
                (bad / "tensors.safetensors").read_bytes(),
                tiny.spec,
                limits,
            )
    assert tree(store.root) == before
    assert [i.name for i in store.list()] == ["keep"]
    assert not (tmp_path / "canary").exists()


def test_every_error_type_has_status_and_stable_type():
    types = [c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.BundleError)]
    assert len({c.error_type for c in types}) == len(types)
    assert {c.status for c in types} <= {400, 404, 409, 413, 422, 500, 507}


def test_fingerprint_message_names_expected_model(good_dir, tiny):
    spec = other_spec(tiny.spec)
    with pytest.raises(E.BundleFingerprintError) as info:
        load_bundle(good_dir, spec)
    assert spec.fingerprint() in str(info.value) and "'other-llava'" in str(info.value)


def test_manifest_with_duplicate_keys_is_refused(good_dir, tmp_path):
    text = (good_dir / "manifest.json").read_text()
    write_raw(tmp_path / "dup", ('{"name": "a", ' + text.lstrip()[1:]).encode(), read_files(good_dir)[1])
    with pytest.raises(E.BundleManifestError, match="duplicate key 'name'"):
        load_bundle(tmp_path / "dup")


def test_bad_input_cases_cover_issue_list():
    wanted = {
        "wrong_shape",
        "wrong_dtype",
        "nan",
        "inf",
        "other_fingerprint",
        "missing_file",
        "extra_file",
        "truncated",
        "pickle_renamed",
        "oversized_header",
        "format_version",
        "size_cap",
        "token_limit",
    }
    assert wanted <= set(CASES)
