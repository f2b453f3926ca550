"""The shipped demo bundles (`demo/bundles`) load against the shipped base (`demo/base`) and do their task
through the serving path where the base alone fails; and (slow) M²PT training on digits beats the base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from m2pt.loading import load_frozen_llava
from training.data import DataOptions, load_data
from training.evaluate import evaluate

DEMO = Path(__file__).resolve().parent.parent / "demo"
# bundle name -> (dataset it was trained on, minimum held-out exact match of the shipped bundle)
SHIPPED = {"digits": ("digits", 0.8), "size": ("synthetic:size", 0.9)}


@pytest.fixture(scope="module")
def demo_base():
    return load_frozen_llava(str(DEMO / "base"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A copy of the shipped store (opening a store sweeps and creates lock files; not in the repo)."""
    from prompts_store.store import BundleStore

    root = tmp_path_factory.mktemp("bundles") / "store"
    shutil.copytree(DEMO / "bundles", root, ignore=shutil.ignore_patterns(".locks", ".tmp"))
    return BundleStore(root)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_bundle_does_its_task_where_the_base_fails(demo_base, store, name):
    dataset, minimum = SHIPPED[name]
    loaded = store.load(name, spec=demo_base.spec)
    assert loaded.manifest.provenance["dataset"]["train"] == dataset
    assert (DEMO / "bundles" / f"{loaded.label}.curves.png").is_file()
    tensors = DEMO / "bundles" / name / loaded.manifest.version / "tensors.safetensors"
    assert tensors.stat().st_size < 600_000
    options = DataOptions(dataset, train_size=1, eval_size=100, seed=0)
    _, held_out = load_data(options, demo_base.processor, demo_base.spec.image_size)
    tuned = evaluate(demo_base.model, held_out, loaded.prompts, batch_size=50).accuracy
    base = evaluate(demo_base.model, held_out, None, batch_size=50).accuracy
    assert tuned >= minimum and base <= 0.2, (tuned, base)


@pytest.mark.slow
def test_m2pt_on_digits_beats_the_frozen_base(demo_base, tmp_path):
    from training.config import TrainConfig
    from training.trainer import train

    cfg = TrainConfig(
        base=str(DEMO / "base"),
        data="digits",
        out=str(tmp_path / "digits"),
        steps=150,
        batch_size=64,
        lr=3e-2,
        projector_lr=5e-3,
        eval_every=0,
        checkpoint_every=0,
        progress=False,
        device="cpu",
    )
    result = train(cfg, base=demo_base)
    _, held_out = load_data(DataOptions("digits"), demo_base.processor, demo_base.spec.image_size)
    base = evaluate(demo_base.model, held_out, None).accuracy
    assert result.final_accuracy > 0.5 and base < 0.15, (result.final_accuracy, base)
