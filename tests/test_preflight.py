"""The transformers release gate and the local-model-path check (m2pt.preflight), also through the real loader
and the `m2pt train` / `m2pt serve` command lines."""

from __future__ import annotations

import logging

import pytest
import transformers

from m2pt import preflight
from m2pt.preflight import (
    ALLOW_ENV,
    TESTED_TRANSFORMERS,
    ModelPathError,
    UntestedTransformersError,
    check_model_source,
    check_transformers_version,
)


def test_installed_release_is_the_tested_one():
    assert transformers.__version__.startswith(TESTED_TRANSFORMERS + ".")
    check_transformers_version()  # does not raise


@pytest.mark.parametrize("version", ["5.23.0", "5.25.0", "4.57.1", "6.0.0"])
def test_other_releases_are_refused_naming_the_tested_one(version, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UntestedTransformersError) as info:
        check_transformers_version(version)
    message = str(info.value)
    assert f"transformers {version} is installed" in message
    assert f"tested with transformers {TESTED_TRANSFORMERS}.x" in message
    assert ALLOW_ENV in message and "constraints.txt" in message


def test_patch_releases_and_local_builds_pass():
    check_transformers_version(f"{TESTED_TRANSFORMERS}.7")
    check_transformers_version(f"{TESTED_TRANSFORMERS}.0+local")


def test_override_logs_a_warning_instead(monkeypatch, caplog):
    monkeypatch.setenv(ALLOW_ENV, "1")
    with caplog.at_level(logging.WARNING, logger=preflight.__name__):
        check_transformers_version("5.23.0")
    assert any("5.23.0" in r.getMessage() and ALLOW_ENV in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(ALLOW_ENV, "0")
    with pytest.raises(UntestedTransformersError):
        check_transformers_version("5.23.0")


def test_loader_refuses_an_untested_release_before_touching_the_model(monkeypatch, tmp_path):
    from m2pt.loading import load_frozen_llava

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.setattr(preflight, "installed_transformers", lambda: "5.23.0")
    with pytest.raises(UntestedTransformersError, match="tested with transformers"):
        load_frozen_llava(str(tmp_path / "never-read"))


@pytest.mark.parametrize(
    "name", ["demo/bsae", "./demo/base2", "/nonexistent/model", "~/no-such-model", "a/b/c"]
)
def test_a_mistyped_local_path_says_it_does_not_exist(name, monkeypatch):
    monkeypatch.chdir(preflight.Path(__file__).resolve().parents[1])  # the repo root, where demo/ exists
    with pytest.raises(ModelPathError, match="does not exist"):
        check_model_source(name)


@pytest.mark.parametrize("name", ["llava-hf/llava-1.5-7b-hf", "gpt2", "demo/base"])
def test_hub_ids_and_existing_dirs_pass(name, monkeypatch):
    monkeypatch.chdir(preflight.Path(__file__).resolve().parents[1])
    check_model_source(name)


def test_m2pt_train_with_a_mistyped_base_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from m2pt_cli.main import main

    monkeypatch.chdir(preflight.Path(__file__).resolve().parents[1])
    out = tmp_path / "b"
    code = main(["train", "--base", "demo/bsae", "--data", "digits", "--out", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'demo/bsae' does not exist" in err
    assert "connect" not in err and "Traceback" not in err
    assert not out.exists()
