"""Held-out evaluation through the serving path: greedy decoding with `prefill` + `decode_step`, exact match.

A prediction is correct when the greedy continuation of the prompt reproduces the reference answer's tokens
and then `</s>` (the answer ids as the data module labels them). Prompts are precomputed once with
`compute_prefix` under `torch.inference_mode()`, exactly as the server does when it loads a bundle;
`prompts=None` evaluates the frozen base. Under torchrun each rank evaluates a strided share and the counts
are summed. This module does not train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from m2pt.families.registry import family_of
from m2pt.prefix import BundlePrefix
from m2pt.prompts import PromptTensors
from training.data import Encoded, EncodedDataset
from training.params import family_rows

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    correct: int
    total: int
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (source, predicted, reference)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def greedy_batch(model: nn.Module, examples: list[Encoded], prefix: BundlePrefix | None) -> list[list[int]]:
    """Greedy tokens for each prompt: as many as the longest answer (+ `</s>`) in the batch."""
    family = family_of(model)
    prompts = [e.input_ids[: e.prompt_len] for e in examples]
    rows = family_rows(family, model, prompts, [e.image_inputs() for e in examples], prefix)
    logits, state = family.prefill(model, rows)  # [B, V]
    steps = max(int(e.answer_ids.shape[0]) for e in examples)
    generated: list[list[int]] = [[] for _ in examples]
    for step in range(steps):
        tokens = logits.argmax(-1)  # [B]
        for b, tok in enumerate(tokens.tolist()):
            generated[b].append(tok)
        if step + 1 < steps:
            logits = family.decode_step(model, state, tokens)
    return generated


def evaluate(
    model: nn.Module,
    dataset: EncodedDataset,
    prompts: PromptTensors | None,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    decode=None,
) -> EvalResult:
    """Exact-match accuracy on this rank's share of `dataset` (the caller sums across ranks)."""
    indices = list(range(rank, len(dataset), world_size))
    result = EvalResult(0, 0)
    with torch.inference_mode():
        prefix = None if prompts is None else family_of(model).compute_prefix(model, prompts)
        for start in range(0, len(indices), batch_size):
            chunk = [dataset.examples[i] for i in indices[start : start + batch_size]]
            for ex, tokens in zip(chunk, greedy_batch(model, chunk, prefix), strict=True):
                answer = ex.answer_ids.tolist()
                ok = tokens[: len(answer)] == answer
                result.correct += int(ok)
                result.total += 1
                if decode is not None and len(result.samples) < 8:
                    result.samples.append((ex.source, decode(tokens), decode(answer)))
    return result
