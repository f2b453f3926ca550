"""In-process measurement of what bounds the batching gain on this machine: prefill cost per request (ViT + LLM
prompt), and decode-step cost at batch 1 versus batch 16. No HTTP, one model, the core's own forward."""

from __future__ import annotations

import time

import torch

from m2pt.forward import DecodeState, RowInput, decode_step, encode_images, prefill
from m2pt.prefix import compute_prefix
from m2pt.prompts import init_prompts


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def measure_cpu_bound(
    frozen, prompt_ids: torch.Tensor, max_tokens: int, batch: int = 16, repeats: int = 2
) -> dict:
    """Returns ms per request for prefill and decode and the implied ceiling of batched/alone throughput."""
    model, spec = frozen.model, frozen.spec
    prefix = compute_prefix(model, init_prompts(spec, 10, 10, model.model.multi_modal_projector.state_dict()))
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size)

    def one_prefill():
        feats = encode_images(model, pixels, [prefix])
        return prefill(model, [RowInput(prompt_ids, feats[0], prefix)])

    prefill_s = _time(one_prefill, repeats)
    states = {}
    for size in (1, batch):
        _, state = one_prefill()
        state = DecodeState.merge([state] + [one_prefill()[1] for _ in range(size - 1)])
        tokens = torch.zeros(size, dtype=torch.long)
        steps = 8
        start = time.perf_counter()
        for _ in range(steps):
            decode_step(model, state, tokens)
        states[size] = (time.perf_counter() - start) / steps
    alone = prefill_s + max_tokens * states[1]
    batched = prefill_s + max_tokens * states[batch] / batch
    return {
        "prefill_ms_per_request": round(prefill_s * 1000, 1),
        "decode_step_ms_batch1": round(states[1] * 1000, 1),
        f"decode_step_ms_batch{batch}": round(states[batch] * 1000, 1),
        "request_ms_alone": round(alone * 1000, 1),
        f"request_ms_in_batch{batch}": round(batched * 1000, 1),
        "max_batching_speedup": round(alone / batched, 2),
        "prefill_share_of_batched_request": round(prefill_s / batched, 2),
    }
