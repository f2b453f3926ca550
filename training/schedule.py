"""What happens at optimiser step `n`, as pure functions of (config, n): the learning-rate factor and the
examples.

Making both pure functions of the step is what makes resume exact (a checkpoint only needs the step number and
the optimiser moments) and what lets N processes agree on the global batch without talking: every rank
computes the same global batch and keeps its own slice (`shard`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps` (step is 0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(total_steps: int, ratio: float) -> int:
    return math.ceil(total_steps * ratio)


@lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of epoch `epoch`: a permutation seeded by (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_examples, generator=gen).tolist())


def global_batch(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of the global batch at `step`: positions [step*B, step*B+B) of the shuffled stream."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        out.append(epoch_order(num_examples, seed, epoch)[offset])
    return out


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of a global batch (strided, so shares differ in size by at most one)."""
    return indices[rank::world_size]
