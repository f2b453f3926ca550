"""Shared helpers of the Qwen-VL tests: tiny checkpoints, rows built by the real processor, strong prompts, and the
reference forward (M²PT's explicit per-layer overwrite of prompt rows, through transformers' own blocks)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.func import functional_call

from m2pt.families.base import ImageInput
from m2pt.families.qwen_vl_vision import DEEPSTACK, MERGER, ImageFeatures
from m2pt.prompts import PromptTensors, init_prompts

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
ATOL = 1e-5


def load_tiny_qwen(tmp_path_factory, family: str):
    from m2pt.loading import load_frozen_llava
    from training.tiny_qwen import TinyQwenVLConfig, build_tiny_qwen_vl

    path = build_tiny_qwen_vl(tmp_path_factory.mktemp(family), TinyQwenVLConfig(family=family))
    return path, load_frozen_llava(str(path), device="cpu", dtype="float32")


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def make_row(frozen, words: str, sizes: list[tuple[int, int]], seed: int):
    """(input_ids [T], images, processor output) for a user turn with images of `sizes` (h, w) then `words`."""
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": words}]
    text = frozen.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    pictures = [random_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    encoded = frozen.processor(images=pictures or None, text=[text], return_tensors="pt")
    return encoded["input_ids"][0], frozen.family.split_images(encoded), encoded


def strong_prompts(frozen, text_len: int, visual_len: int, projector: bool, seed: int) -> PromptTensors:
    """Xavier prompts x40 and the base projector plus noise (visible effects on a 32-wide tiny model)."""
    base = frozen.family.projector(frozen.model).state_dict() if projector else None
    prompts = init_prompts(frozen.spec, text_len, visual_len, base, seed=seed)
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


# ------------------------------------------------------------------ reference: the official overwrite semantics
def _projected(module, weights, prefix, x):
    if weights is None:
        return module(x)
    return functional_call(
        module, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, (x,)
    )


def _tower_inputs(visual, pixels, grid, qwen3):
    """Patch embeddings, RoPE tables and chunk boundaries exactly as the HF tower's forward prepares them."""
    from transformers import vision_utils as vu

    merge = visual.spatial_merge_size
    hidden = visual.patch_embed(pixels)
    window_index = cu_window = None
    if qwen3:
        idx, w = vu.get_vision_interpolation_indices_and_weights(
            grid, visual.num_grid_per_side, "bilinear", True, visual.config.spatial_merge_size
        )
        hidden = hidden + (visual.pos_embed(idx) * w[:, :, None]).sum(1)
    else:
        window_index, cu_window = vu.get_vision_window_index(
            grid, merge, visual.window_size, visual.patch_size
        )
        hidden = visual.permute_input_for_window_attn(hidden, window_index, hidden.shape[0])
    cos, sin = visual.rotary_pos_emb(hidden, vu.get_vision_position_ids(grid, merge))
    if not qwen3:
        cos, sin = (
            visual.permute_input_for_window_attn(t, window_index, hidden.shape[0]) for t in (cos, sin)
        )
    return hidden, (cos, sin), vu.get_vision_cu_seqlens(grid), cu_window, window_index


def _overwrite_block(block, hidden, rope, cu, starts, layer, visual_prompts):
    """HF's block on a sequence where every chunk is preceded by its image's prompt rows P_v[layer] (no RoPE:
    cos 1, sin 0); the prompt rows' outputs are dropped (overwritten at the next layer)."""
    rows, cos, sin, keep, lengths = [], [], [], [], []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        owner = max(i for i, s in enumerate(starts) if s <= start)
        prompt = visual_prompts[owner]
        lv = 0 if prompt is None else prompt.shape[1]
        if lv:
            rows.append(prompt[layer])
            cos.append(torch.ones(lv, rope[0].shape[1]))
            sin.append(torch.zeros(lv, rope[1].shape[1]))
        rows.append(hidden[start:end])
        cos.append(rope[0][start:end])
        sin.append(rope[1][start:end])
        keep += [False] * lv + [True] * (end - start)
        lengths.append(lv + end - start)
    cu_ext = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    out = block(torch.cat(rows), cu_seqlens=cu_ext, position_embeddings=(torch.cat(cos), torch.cat(sin)))
    return out[torch.tensor(keep)]


def reference_image_features(frozen, images: list[ImageInput], prompts: list[PromptTensors | None]):
    """Per-image `ImageFeatures` under the official overwrite semantics (one `PromptTensors` or None per image)."""
    model, qwen3 = frozen.model, frozen.family.model_type == "qwen3_vl"
    visual = model.model.visual
    grid = torch.stack([im.extras["image_grid_thw"] for im in images])
    pixels = torch.cat([im.pixel_values for im in images])
    hidden, rope, cu_full, cu_window, window_index = _tower_inputs(visual, pixels, grid, qwen3)
    sizes = grid.prod(-1).tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    visual_prompts = [None if p is None else p.visual for p in prompts]
    projectors = [None if p is None else p.projector for p in prompts]
    taps = []
    for layer, block in enumerate(visual.blocks):
        full = qwen3 or layer in visual.fullatt_block_indexes
        hidden = _overwrite_block(
            block, hidden, rope, cu_full if full else cu_window, starts, layer, visual_prompts
        )
        if qwen3 and layer in visual.deepstack_visual_indexes:
            j = visual.deepstack_visual_indexes.index(layer)
            name = f"{DEEPSTACK}{j}."
            taps.append(
                [
                    _projected(visual.deepstack_merger_list[j], pj, name, hidden[s : s + n])
                    for s, n, pj in zip(starts, sizes, projectors, strict=True)
                ]
            )
    merged = [
        _projected(visual.merger, pj, MERGER, hidden[s : s + n])
        for s, n, pj in zip(starts, sizes, projectors, strict=True)
    ]
    if not qwen3:
        flat = torch.cat(merged)[torch.argsort(window_index)]
        merged = list(torch.split(flat, [n // visual.spatial_merge_size**2 for n in sizes]))
    return [
        ImageFeatures(merged[i], grid[i], torch.stack([t[i] for t in taps]) if taps else None)
        for i in range(len(images))
    ]


def reference_logits(frozen, ids, images: list[ImageInput], prompts: PromptTensors | None):
    """Logits [T, V] of one row with its prompts as Lt leading text tokens, overwritten at every decoder layer."""
    model = frozen.model
    prompts = prompts or PromptTensors()
    feats = reference_image_features(frozen, images, [prompts] * len(images)) if images else []
    lt = prompts.text_len
    lm = model.model.language_model
    embeds = model.model.get_input_embeddings()(ids[None])  # [1, T, D]
    slots = ids[None] == model.config.image_token_id
    if feats:
        merged = torch.cat([f.embeds for f in feats])
        embeds = embeds.masked_scatter(slots[..., None].expand_as(embeds), merged)
    ext_ids = torch.cat([torch.zeros(lt, dtype=torch.long), ids])  # prompts = leading text tokens
    types = (ext_ids == model.config.image_token_id).long()
    if feats:
        grid = torch.stack([im.extras["image_grid_thw"] for im in images])
        positions, _ = model.model.get_rope_index(ext_ids[None], types[None], image_grid_thw=grid)
    else:
        positions = torch.arange(ext_ids.shape[0]).expand(3, 1, -1)
    kwargs = {}
    if feats and feats[0].deepstack is not None:
        kwargs["visual_pos_masks"] = torch.cat([torch.zeros(1, lt, dtype=torch.bool), slots], dim=1)
        kwargs["deepstack_visual_embeds"] = list(torch.cat([f.deepstack for f in feats], dim=1))
    hooks = []
    if lt:
        embeds = torch.cat([prompts.text[0][None], embeds], dim=1)

        def overwrite(layer_idx):
            def hook(module, args, kw):
                return (torch.cat([prompts.text[layer_idx][None], args[0][:, lt:]], dim=1), *args[1:]), kw

            return hook

        hooks = [
            layer.register_forward_pre_hook(overwrite(i), with_kwargs=True)
            for i, layer in enumerate(lm.layers)
        ]
    try:
        out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return model.lm_head(out.last_hidden_state[:, lt:])[0]
