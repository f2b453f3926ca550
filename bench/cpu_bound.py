"""In-process measurement of what bounds the batching gain on this machine: prefill cost per request (ViT + LLM
prompt), and decode-step cost at batch 1 versus batch 16. No HTTP, one model, the core's own forward."""

from __future__ import annotations

import time

import torch

from m2pt.forward import DecodeState, RowInput, decode_step, encode_images, prefill
from m2pt.prefix import compute_prefix
from m2pt.prompts import init_prompts


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` memory bandwidth of a large tensor copy (bytes read + written per second, GB/s)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step must read: every LLM layer, the final norm and the LM head (the embedding
    table is read for one row only)."""
    lm = model.model.language_model
    params = [p for layer in lm.layers for p in layer.parameters()] + list(lm.norm.parameters())
    params += list(model.lm_head.parameters())
    return sum(p.numel() * p.element_size() for p in params)


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
    bandwidth = copy_bandwidth_gbs()
    bound_s = decode_weight_bytes(model) / (bandwidth * 1e9)
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
        "copy_bandwidth_gb_s": round(bandwidth, 2),
        "decode_weight_mb": round(decode_weight_bytes(model) / 1e6, 1),
        "decode_bandwidth_bound_ms_batch1": round(bound_s * 1000, 1),
        "decode_batch1_vs_bandwidth_bound": round(states[1] / bound_s, 2),
    }
