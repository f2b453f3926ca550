"""Shared fixtures: a tiny real LLaVA checkpoint built from configs (about a second), loaded frozen on CPU."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Nothing a test trains, publishes or uploads may land in the real user store (~/.local/share/m2pt).
os.environ["M2PT_HOME"] = tempfile.mkdtemp(prefix="m2pt-test-home-")
atexit.register(shutil.rmtree, os.environ["M2PT_HOME"], ignore_errors=True)
os.environ.pop("M2PT_STORE", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from training.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny base, frozen, fp32 on CPU (a `FrozenLlava`)."""
    from m2pt.loading import load_frozen_llava

    return load_frozen_llava(str(tiny_model_dir), device="cpu", dtype="float32")
