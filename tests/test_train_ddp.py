"""Data-parallel training: `torchrun --nproc-per-node 2 -m training ...` (gloo, CPU) produces the same prompts
as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from m2pt.prompts import init_prompts
from training.config import TrainConfig
from training.trainer import train

COMMON = dict(
    data="digits",
    train_size=16,
    eval_size=4,
    steps=3,
    batch_size=8,
    lr=1e-2,
    text_prompts=3,
    visual_prompts=2,
    eval_every=0,
    checkpoint_every=0,
    device="cpu",
    progress=False,
    seed=0,
)


def as_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if key == "progress":
            flags.append("--no-progress")
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny, tiny_model_dir, tmp_path):
    from prompts_store.format import load_bundle

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training",
        "--base",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--name",
        "ddp",
        *as_flags(COMMON),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1/2 on cpu (gloo)" in proc.stderr

    single = train(
        TrainConfig(base=str(tiny_model_dir), out=str(tmp_path / "single"), name="single", **COMMON),
        base=tiny,
    )
    loaded = load_bundle(out, spec=tiny.spec)
    assert loaded.manifest.provenance["world_size"] == 2
    two, one = loaded.prompts.to_flat(), single.prompts.to_flat()
    assert set(two) == set(one)
    for key in one:
        assert torch.allclose(two[key], one[key], atol=1e-5, rtol=0), (key, (two[key] - one[key]).abs().max())
    start = init_prompts(
        tiny.spec, 3, 2, tiny.model.model.multi_modal_projector.state_dict(), seed=0
    ).to_flat()
    assert all((start[k] - one[k]).abs().max() > 1e-3 for k in one), "training must move every tensor"
