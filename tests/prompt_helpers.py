"""Prompts for tests that must visibly change the tiny model's output (Xavier bounds are tiny for a 32-wide model)."""

from __future__ import annotations

import torch

from m2pt.prompts import PromptTensors, init_prompts


def strong_prompts(tiny, text_len: int, visual_len: int, projector: bool, seed: int) -> PromptTensors:
    """Xavier prompts scaled ×40, and the base projector plus noise, for the tiny model `tiny` (a FrozenLlava)."""
    base = tiny.model.model.multi_modal_projector.state_dict() if projector else None
    prompts = init_prompts(tiny.spec, text_len, visual_len, base, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    if prompts.text is not None:
        prompts.text = prompts.text * 40
    if prompts.visual is not None:
        prompts.visual = prompts.visual * 40
    if prompts.projector is not None:
        prompts.projector = {
            k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in prompts.projector.items()
        }
    return prompts


def row_tokens(tiny, words: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `<s> user : <image>*N words assistant :` ([T] long) and a random image ([3, H, W])."""
    tok = tiny.processor.tokenizer
    n_img = tiny.spec.num_image_tokens
    ids = [1] + tok.convert_tokens_to_ids(["user", ":"]) + [tiny.spec.image_token_id] * n_img
    ids += tok.convert_tokens_to_ids(words) + tok.convert_tokens_to_ids(["assistant", ":"])
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, tiny.spec.image_size, tiny.spec.image_size, generator=gen)
    return torch.tensor(ids), pixels
