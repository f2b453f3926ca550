"""Next-token choice per row: greedy at temperature 0, otherwise temperature + nucleus (top-p) sampling with an
optional per-request seed. Rows of one batch may use different settings."""

from __future__ import annotations

import torch
from torch import Tensor

from server.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator for reproducible sampling, or None (greedy, or unseeded sampling)."""
    if params.temperature == 0 or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token id from logits [V]."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [B, V] -> B token ids. Greedy rows share one argmax."""
    greedy = logits.argmax(-1).tolist()
    return [
        greedy[row] if p.temperature == 0 else sample_row(logits[row], p, generators[row])
        for row, p in enumerate(params)
    ]
