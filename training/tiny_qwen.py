"""Small, real Qwen2.5-VL and Qwen3-VL checkpoints built from configs (random init, seconds to build).

Each keeps the real family's structure and key choices, cut in width and depth:
- Qwen2.5-VL (stands for Qwen/Qwen2.5-VL-7B-Instruct): RMSNorm ViT blocks with a fused qkv, 2-D axial vision RoPE,
  windowed attention in every block except `fullatt_block_indexes`, a 2x2 patch merger (RMSNorm + MLP), Qwen2 LLM with
  q/k/v biases, GQA, untied embeddings and M-RoPE (`mrope_section`, summed to head_dim / 2).
- Qwen3-VL (stands for Qwen/Qwen3-VL-2B-Instruct): LayerNorm ViT blocks, learned interpolated position embeddings +
  2-D vision RoPE, full attention per image, deepstack mergers feeding early LLM layers, Qwen3 LLM with q/k-norm,
  GQA, tied embeddings and interleaved M-RoPE.

The processor is the family's own class with the PIL image processor, the word-level tokenizer of `training.tiny` plus
the Qwen special tokens, and NO video processor (the video processors need torchvision, which is not installed; see
`m2pt.families.qwen_vl.load_processor`). Text init std is raised so random models answer varied words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PAD_ID, IM_START_ID, EOS_ID, VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID = range(7)

# Qwen's chat layout; the word-level tokenizer drops the newlines, which is harmless for tests.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE_WORDS = ["user", "assistant", "system", ":", "?", ".", ","]


@dataclass
class TinyQwenVLConfig:
    """Sizes of a tiny Qwen-VL. `family` is "qwen2_5_vl" or "qwen3_vl"."""

    family: str = "qwen2_5_vl"
    words: list[str] = field(
        default_factory=lambda: [str(d) for d in range(10)] + ["what", "is", "this", "digit", "red", "blue"]
    )
    patch_size: int = 8
    merge_size: int = 2
    vit_dim: int = 32
    vit_layers: int = 4
    vit_heads: int = 2
    vit_mlp: int = 64
    window_size: int = 32  # Qwen2.5-VL: 2x2 merged units per window (real: 112 / 14 / 2 = 4)
    llm_dim: int = 64
    llm_layers: int = 3  # > len(deepstack_visual_indexes): the last deepstack tap must feed a later layer
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_mlp: int = 128
    min_pixels: int = 16 * 16
    max_pixels: int = 64 * 64
    text_init_std: float = 0.2
    seed: int = 0

    def vocabulary(self) -> list[str]:
        return list(dict.fromkeys(QWEN_SPECIAL + BASE_WORDS + [w.lower() for w in self.words]))


def build_qwen_tokenizer(vocab: list[str]):  # -> PreTrainedTokenizerFast
    """Word-level tokenizer with the Qwen special tokens (no BOS, EOS `<|im_end|>`, pad `<|endoftext|>`)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(QWEN_SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
    )


def build_image_processor(cfg: TinyQwenVLConfig):  # -> Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
        patch_size=cfg.patch_size,
        merge_size=cfg.merge_size,
        temporal_patch_size=2,
    )


def build_qwen_processor(cfg: TinyQwenVLConfig, tokenizer):  # -> the family's processor, images only
    from m2pt.families.qwen_vl_processor import build_image_only_processor

    return build_image_only_processor(cfg.family, build_image_processor(cfg), tokenizer, QWEN_CHAT_TEMPLATE)


def _vision_config(cfg: TinyQwenVLConfig) -> dict[str, Any]:
    common = {
        "depth": cfg.vit_layers,
        "hidden_size": cfg.vit_dim,
        "intermediate_size": cfg.vit_mlp,
        "num_heads": cfg.vit_heads,
        "patch_size": cfg.patch_size,
        "spatial_merge_size": cfg.merge_size,
        "temporal_patch_size": 2,
        "out_hidden_size": cfg.llm_dim,
    }
    if cfg.family == "qwen2_5_vl":
        last = cfg.vit_layers - 1
        return {
            **common,
            "hidden_act": "silu",
            "window_size": cfg.window_size,
            "fullatt_block_indexes": [last // 2, last],  # real 7B: [7, 15, 23, 31] of 32
            "tokens_per_second": 2,
        }
    return {
        **common,
        "hidden_act": "gelu_pytorch_tanh",
        "num_position_embeddings": 64,  # an 8x8 learned grid, interpolated per image (real: 48x48)
        "deepstack_visual_indexes": [0, cfg.vit_layers // 2],  # real 2B: [5, 11, 17] of 24
    }


def _text_config(cfg: TinyQwenVLConfig, vocab_size: int) -> dict[str, Any]:
    head_dim = cfg.llm_dim // cfg.llm_heads
    half = head_dim // 2
    common = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.llm_dim,
        "intermediate_size": cfg.llm_mlp,
        "num_hidden_layers": cfg.llm_layers,
        "num_attention_heads": cfg.llm_heads,
        "num_key_value_heads": cfg.llm_kv_heads,
        "max_position_embeddings": 2048,
        "initializer_range": cfg.text_init_std,
        "pad_token_id": PAD_ID,
        "bos_token_id": None,
        "eos_token_id": EOS_ID,
    }
    if cfg.family == "qwen2_5_vl":
        section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # real: [16, 24, 24] of 64
        return {
            **common,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
        }
    section = [half - 2 * (half // 4), half // 4, half // 4]  # real: [24, 20, 20] of 64
    return {
        **common,
        "head_dim": head_dim,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": section,
            "mrope_interleaved": True,
        },
    }


def build_qwen_model(
    cfg: TinyQwenVLConfig, vocab_size: int
):  # -> Qwen2_5_VL / Qwen3VL ForConditionalGeneration
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    config_cls, model_cls = (
        (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)
        if cfg.family == "qwen2_5_vl"
        else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    )
    config = config_cls(
        vision_config=_vision_config(cfg),
        text_config=_text_config(cfg, vocab_size),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=cfg.family == "qwen3_vl",
    )
    torch.manual_seed(cfg.seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def build_tiny_qwen_vl(out_dir: str | Path, cfg: TinyQwenVLConfig | None = None, model=None) -> Path:
    """Write a loadable checkpoint (config, safetensors weights, tokenizer, image processor, processor config)."""
    cfg = cfg or TinyQwenVLConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = cfg.vocabulary()
    tokenizer = build_qwen_tokenizer(vocab)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    model = model if model is not None else build_qwen_model(cfg, len(vocab))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # writes chat_template.jinja
    build_image_processor(cfg).save_pretrained(out)
    log.info("wrote tiny %s (%d params) to %s", cfg.family, sum(p.numel() for p in model.parameters()), out)
    return out
