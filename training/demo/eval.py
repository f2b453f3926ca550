"""Greedy exact-match evaluation of a LLaVA checkpoint on the synthetic tasks, through the serving code path.

Contract:
- `answer(frozen, images, questions)` builds every prompt with the processor's chat template and the processor
  itself (exactly as a server does), runs `m2pt.forward.encode_images` + `prefill` + `decode_step` greedily,
  and returns the decoded answers (special tokens dropped, words joined by spaces).
- `evaluate(frozen, tasks, n, seed)` scores `n` fixed examples per task (`training.demo.synthetic.make_examples`)
  by exact string match and returns per-task and overall accuracy.
- The held-out set is `HELD_OUT_SEED`; training draws from its own stream and validates on `VALIDATION_SEED`.
This module does NOT train, and writes no files (the CLI in training/demo/base.py does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from training.demo.data import processor_prompt_ids
from training.demo.synthetic import Example, make_examples
from training.tiny import EOS_ID

log = logging.getLogger(__name__)

HELD_OUT_SEED = 1_000_003
VALIDATION_SEED = 2_000_029
MAX_ANSWER_TOKENS = 4  # the longest answer is two words; one more for </s>, one spare to see run-ons


@torch.inference_mode()
def answer(
    frozen, images: Sequence, questions: Sequence[str], max_new_tokens: int = MAX_ANSWER_TOKENS
) -> list[str]:
    """Greedy answers of a `FrozenLlava` (no bundle) for one image + one question per row."""
    from m2pt.forward import RowInput, decode_step, encode_images, prefill

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
    if not images:
        return []
    model, processor = frozen.model, frozen.processor
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    features = encode_images(model, pixels.to(frozen.device, frozen.dtype), [None] * len(images))  # [B, N, D]
    rows = [
        RowInput(torch.tensor(processor_prompt_ids(processor, q, img)), features[b], None)
        for b, (img, q) in enumerate(zip(images, questions, strict=True))
    ]
    logits, state = prefill(model, rows)  # [B, V]
    generated: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)  # [B]
        for b in range(len(rows)):
            if not done[b] and int(tokens[b]) != EOS_ID:
                generated[b].append(int(tokens[b]))
        done |= tokens == EOS_ID
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = decode_step(model, state, tokens)
    tokenizer = processor.tokenizer
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]


@dataclass
class EvalResult:
    """Exact-match accuracy per task and overall, with the misses for inspection."""

    per_task: dict[str, float]
    overall: float
    n_per_task: int
    seed: int
    misses: list[dict[str, str]] = field(default_factory=list)

    def to_json(self, max_misses: int = 20) -> dict:
        return {
            "per_task": {k: round(v, 4) for k, v in self.per_task.items()},
            "overall": round(self.overall, 4),
            "n_per_task": self.n_per_task,
            "seed": self.seed,
            "misses": self.misses[:max_misses],
        }


def score(examples: Sequence[Example], predictions: Sequence[str], seed: int) -> EvalResult:
    """Exact-match accuracy of `predictions` against `examples`, grouped by task."""
    hits: dict[str, list[bool]] = {}
    misses: list[dict[str, str]] = []
    for ex, pred in zip(examples, predictions, strict=True):
        ok = pred == ex.answer
        hits.setdefault(ex.task, []).append(ok)
        if not ok:
            misses.append({"task": ex.task, "question": ex.question, "answer": ex.answer, "predicted": pred})
    per_task = {task: sum(v) / len(v) for task, v in hits.items()}
    total = [h for v in hits.values() for h in v]
    overall = sum(total) / len(total) if total else 0.0
    n = len(next(iter(hits.values()))) if hits else 0
    return EvalResult(per_task, overall, n, seed, misses)


def evaluate(
    frozen, tasks: Sequence[str], n: int, seed: int = HELD_OUT_SEED, batch_size: int = 64
) -> EvalResult:
    """Greedy exact match on `n` fixed examples of each task."""
    examples = make_examples(list(tasks), n, seed)
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        predictions += answer(frozen, [e.image for e in chunk], [e.question for e in chunk])
    result = score(examples, predictions, seed)
    log.info("held-out exact match %.4f over %d examples", result.overall, len(examples))
    return result


def format_table(result: EvalResult, title: str = "held-out greedy exact match") -> str:
    """A small text table: one line per task, then the overall line."""
    lines = [f"{title} ({result.n_per_task} per task, seed {result.seed})"]
    lines += [f"  {task:<8} {acc * 100:6.1f} %" for task, acc in result.per_task.items()]
    lines.append(f"  {'overall':<8} {result.overall * 100:6.1f} %")
    return "\n".join(lines) + "\n"
