"""Build small, real LLaVA checkpoints from configs: a word-level tokenizer trained locally, a vision tower,
an LLM, a processor with a chat template, all written with `save_pretrained` so that `AutoProcessor` and
`LlavaForConditionalGeneration.from_pretrained` load them offline.

Families (`TinyLlavaConfig.family`): `llava` (CLIP + Llama, LLaVA-1.5's shape) and `llava-siglip-qwen2`
(`llava-hf/llava-interleave-qwen-0.5b-hf`'s shape: SigLIP tower without head, strategy `full`, layer -1,
Qwen2 LLM with qkv bias, tied embeddings, rope theta 1e6), `llava-next-mistral`, `gemma3` and
`llava-onevision-qwen2` (`onevision_cfg`: llava-onevision-qwen2-0.5b-ov's shape, image-only processor built
without torchvision). Only widths and depths are cut.

Tests build one in about a second; the demo base model (training/demo/base.py) uses the same builder at a
larger size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)

# User turn, then "assistant :"; the answer follows and ends with </s>. Content may be a string or a list
# of parts ({"type": "image"} / {"type": "text", "text": ...}), as LlavaProcessor.apply_chat_template
# passes them.
GEMMA3_SPECIALS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
# OneVision's tokenizer has a `<video>` token too; without it unknown words would count as video placeholders
ONEVISION_SPECIALS = {"image_token": "<image>", "video_token": "<video>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %} assistant :"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %} {{ part['text'] }}{% endfor %}{% endif %} </s> "
    "{% endif %}{% endfor %}"
)


def chat_template(placeholder: str) -> str:
    """`CHAT_TEMPLATE` with another image placeholder (Gemma 3's user-facing one is `<start_of_image>`)."""
    return CHAT_TEMPLATE.replace("<image> ", placeholder + " ")


BASE_WORDS = ["user", "assistant", ":", "?", ".", ","]
FAMILIES = ("llava", "llava-siglip-qwen2", "llava-next-mistral", "gemma3", "llava-onevision-qwen2")
# llava-v1.6-mistral-7b's pinpoints (multiples of its 336 px tile) scaled to a tile of `image_size`
NEXT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def interleave_cfg(**overrides) -> TinyLlavaConfig:
    """A tiny `llava-interleave-qwen`-shaped config (SigLIP + Qwen2, strategy full, layer -1)."""
    base = dict(
        family="llava-siglip-qwen2", select_strategy="full", patch_size=4, vit_layers=3, text_init_std=0.2
    )
    return TinyLlavaConfig(**{**base, **overrides})


def onevision_cfg(**overrides) -> TinyLlavaConfig:
    """A tiny `llava-onevision-qwen2-0.5b-ov`-shaped config: SigLIP (no head) + Qwen2 (GQA, biases, tied,
    rope 1e6), strategy full, layer -1, any-res pinpoints (1..6) x (1..6) tiles, `anyres_max_9` pooling,
    image_newline. Only widths/depths/sizes are cut (tile 16 px, patch 4)."""
    base = dict(
        family="llava-onevision-qwen2", select_strategy="full", patch_size=4, vit_layers=3, text_init_std=0.2
    )
    return TinyLlavaConfig(**{**base, **overrides})


def next_cfg(**overrides) -> TinyLlavaConfig:
    """A tiny `llava-v1.6-mistral`-shaped config (any-res CLIP tiles + image_newline, layer -2, Mistral
    GQA)."""
    base = dict(
        family="llava-next-mistral", patch_size=4, vit_layers=3, vision_feature_layer=-2, text_init_std=0.2
    )
    return TinyLlavaConfig(**{**base, **overrides})


@dataclass
class TinyLlavaConfig:
    """Sizes of a tiny LLaVA. The defaults build a ~0.2 M parameter model for unit tests."""

    words: list[str] = field(
        default_factory=lambda: [str(d) for d in range(10)] + ["what", "is", "this", "digit"]
    )
    image_size: int = 16
    patch_size: int = 8
    vit_dim: int = 32
    vit_layers: int = 2
    vit_heads: int = 2
    vit_mlp: int = 64
    llm_dim: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_head_dim: int | None = (
        None  # default llm_dim // llm_heads; set it to decouple width from attention cost
    )
    llm_mlp: int = 128
    select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    max_positions: int = 512
    seed: int = 0
    vision_feature_layer: int | list[int] = -1
    mm_tokens: int = 4  # Gemma 3: image tokens after the projector's average pooling (real: 256)
    sliding_window: int = 6  # Gemma 3: local layers' window (real: 1024); small so tests cross it
    family: str = "llava"  # see FAMILIES
    llm: str | None = None  # override the family's LLM: "llama", "mistral", "qwen2" or "qwen3"
    text_init_std: float | None = None  # LLM init std (None: the config default); larger gives varied outputs

    @property
    def siglip(self) -> bool:
        return self.family == "llava-siglip-qwen2"

    @property
    def anyres(self) -> bool:
        return self.family == "llava-next-mistral"

    @property
    def onevision(self) -> bool:
        return self.family == "llava-onevision-qwen2"

    def pinpoints(self) -> list[list[int]]:
        if self.onevision:  # llava-onevision's: every (h, w) grid of 1..6 tiles
            return [[h * self.image_size, w * self.image_size] for h in range(1, 7) for w in range(1, 7)]
        return [[h * self.image_size, w * self.image_size] for h, w in NEXT_PINPOINTS]

    @property
    def gemma3(self) -> bool:
        return self.family == "gemma3"

    def vocabulary(self) -> list[str]:
        extra = GEMMA3_SPECIALS if self.gemma3 else ONEVISION_SPECIALS if self.onevision else {}
        specials = SPECIAL_TOKENS + [t for t in extra.values() if t not in SPECIAL_TOKENS]
        seen = dict.fromkeys(specials + BASE_WORDS + [w.lower() for w in self.words])
        return list(seen)


def build_tokenizer(vocab: list[str], specials: dict[str, str] | None = None):  # -> PreTrainedTokenizerFast
    """Word-level tokenizer: lowercases, splits on whitespace and punctuation, adds `<s>` in front."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=specials or {"image_token": "<image>"},
        padding_side="left",
    )


def build_image_processor(cfg: TinyLlavaConfig):
    """CLIP: resize the short edge + centre crop, CLIP mean/std. SigLIP: resize to a square, mean/std 0.5."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, SiglipImageProcessorPil

    if cfg.anyres:
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": cfg.image_size},
            crop_size={"height": cfg.image_size, "width": cfg.image_size},
            image_grid_pinpoints=cfg.pinpoints(),
        )
    if cfg.siglip:
        return SiglipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})
    return CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )


def build_processor(
    cfg: TinyLlavaConfig, tokenizer
):  # -> LlavaProcessor / LlavaNextProcessor / Gemma3Processor
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, LlavaNextProcessor, LlavaProcessor

    if (
        cfg.gemma3
    ):  # SigLIP normalisation, square resize, no pan-and-scan; image_seq_length = mm_tokens_per_image
        return Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size}),
            tokenizer=tokenizer,
            image_seq_length=cfg.mm_tokens,
            chat_template=chat_template(GEMMA3_SPECIALS["boi_token"]),
        )

    if cfg.onevision:
        return build_onevision_processor(cfg, tokenizer)
    return (LlavaNextProcessor if cfg.anyres else LlavaProcessor)(
        image_processor=build_image_processor(cfg),
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy=cfg.select_strategy,
        num_additional_image_tokens=0 if cfg.siglip else 1,  # the CLS token (SigLIP has none)
        chat_template=CHAT_TEMPLATE,
    )


def build_onevision_processor(cfg: TinyLlavaConfig, tokenizer):  # -> image-only LlavaOnevisionProcessor
    """OneVision's processor without a video processor (no torchvision): square resize to the tile, SigLIP
    mean/std 0.5, any-res tiling over the pinpoints."""
    from transformers import LlavaOnevisionImageProcessorPil

    from m2pt.families.llava_onevision_processor import build_image_only_processor

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size},
        image_grid_pinpoints=cfg.pinpoints(),
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return build_image_only_processor(
        image_processor,
        tokenizer,
        num_image_tokens=(cfg.image_size // cfg.patch_size) ** 2,
        vision_feature_select_strategy=cfg.select_strategy,
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATE,
    )


def build_onevision_model(cfg: TinyLlavaConfig, vocab_size: int):  # -> LlavaOnevisionForConditionalGeneration
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        vision_config=build_vision_config(cfg),
        text_config=build_text_config(cfg, vocab_size),
        image_token_index=IMAGE_ID,
        video_token_index=cfg.vocabulary().index(ONEVISION_SPECIALS["video_token"]),  # videos are refused
        vision_feature_select_strategy=cfg.select_strategy,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=cfg.pinpoints(),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(config_tied(cfg)),
    )
    torch.manual_seed(cfg.seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def build_vision_config(cfg: TinyLlavaConfig):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    sizes = dict(
        hidden_size=cfg.vit_dim,
        intermediate_size=cfg.vit_mlp,
        num_hidden_layers=cfg.vit_layers,
        num_attention_heads=cfg.vit_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    if (
        cfg.siglip or cfg.gemma3 or cfg.onevision
    ):  # llava-interleave / OneVision / Gemma 3: siglip-so400m without the pooling head
        return SiglipVisionConfig(**sizes, vision_use_head=False, hidden_act="gelu_pytorch_tanh")
    return CLIPVisionConfig(**sizes, projection_dim=cfg.vit_dim)


def build_gemma3_model(cfg: TinyLlavaConfig, vocab_size: int):  # -> Gemma3ForConditionalGeneration
    """gemma-3-4b-it's shape: SigLIP (no head), 5 local : 1 global layers, local rope theta 1e4 / global 1e6,
    q/k-norm, GQA, avg-pool + RMSNorm projector to `mm_tokens` tokens (embeddings untied, see below)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    vocab = cfg.vocabulary()
    text = Gemma3TextConfig(
        hidden_size=cfg.llm_dim,
        intermediate_size=cfg.llm_mlp,
        num_hidden_layers=6,
        num_attention_heads=cfg.llm_heads,
        num_key_value_heads=cfg.llm_kv_heads,
        head_dim=cfg.llm_dim // cfg.llm_heads,
        query_pre_attn_scalar=cfg.llm_dim // cfg.llm_heads,
        vocab_size=vocab_size,
        max_position_embeddings=cfg.max_positions,
        sliding_window=cfg.sliding_window,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=cfg.text_init_std or 0.02,
        # Untied, unlike the real checkpoints: with tied, sqrt(d)-scaled embeddings a random-init Gemma 3
        # always repeats its last input token, so no bundle could change an answer. The prompt math does not
        # read lm_head.
        tie_word_embeddings=False,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=build_vision_config(cfg),
        mm_tokens_per_image=cfg.mm_tokens,
        boi_token_index=vocab.index(GEMMA3_SPECIALS["boi_token"]),
        eoi_token_index=vocab.index(GEMMA3_SPECIALS["eoi_token"]),
        image_token_index=vocab.index(GEMMA3_SPECIALS["image_token"]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # HF initialises the projector matrix to zeros (images would have no effect)
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.copy_(torch.randn(weight.shape) * weight.shape[0] ** -0.5)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def gemma3_cfg(**overrides) -> TinyLlavaConfig:
    """A tiny `google/gemma-3-4b-it`-shaped config."""
    base = dict(family="gemma3", patch_size=4, vit_layers=3, text_init_std=0.2)
    return TinyLlavaConfig(**{**base, **overrides})


def build_text_config(cfg: TinyLlavaConfig, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=cfg.llm_dim,
        intermediate_size=cfg.llm_mlp,
        num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads,
        num_key_value_heads=cfg.llm_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if cfg.text_init_std is not None:
        common["initializer_range"] = cfg.text_init_std
    llm = cfg.llm or ("qwen2" if cfg.siglip or cfg.onevision else "mistral" if cfg.anyres else "llama")
    if llm == "qwen3":  # Qwen3: per-head q/k RMSNorm, explicit head_dim, tied (0.6B-4B), rope theta 1e6
        return Qwen3Config(
            **common,
            head_dim=cfg.llm_head_dim or cfg.llm_dim // cfg.llm_heads,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
    if llm == "qwen2":  # Qwen2-0.5B: qkv bias (built in), tied embeddings, rope theta 1e6
        return Qwen2Config(
            **common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        )
    if llm == "mistral":  # Mistral-7B-v0.2: GQA, rope theta 1e6, no sliding window, untied
        return MistralConfig(
            **common,
            tie_word_embeddings=False,
            sliding_window=None,
            head_dim=cfg.llm_dim // cfg.llm_heads,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
    return LlamaConfig(
        **common, tie_word_embeddings=False, head_dim=cfg.llm_head_dim or cfg.llm_dim // cfg.llm_heads
    )


def config_tied(cfg: TinyLlavaConfig) -> bool:
    return (cfg.llm or ("qwen2" if cfg.siglip or cfg.onevision else "")) in ("qwen2", "qwen3")


def build_model(cfg: TinyLlavaConfig, vocab_size: int):  # -> LlavaForConditionalGeneration (or NeXT)
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    if cfg.family not in FAMILIES:
        raise ValueError(f"unknown tiny family {cfg.family!r}; choose one of {', '.join(FAMILIES)}")
    if cfg.onevision:
        return build_onevision_model(cfg, vocab_size)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    has_cls = not cfg.siglip
    config_class, model_class = (
        (LlavaNextConfig, LlavaNextForConditionalGeneration)
        if cfg.anyres
        else (LlavaConfig, LlavaForConditionalGeneration)
    )
    extra = {"image_grid_pinpoints": cfg.pinpoints()} if cfg.anyres else {}
    config = config_class(
        **extra,
        vision_config=build_vision_config(cfg),
        text_config=build_text_config(cfg, vocab_size),
        image_token_index=IMAGE_ID,
        image_seq_length=patches + int(has_cls) - int(cfg.select_strategy == "default"),
        vision_feature_select_strategy=cfg.select_strategy,
        vision_feature_layer=cfg.vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(config_tied(cfg)),
    )
    torch.manual_seed(cfg.seed)
    model = model_class(config)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def build_tiny_llava(out_dir: str | Path, cfg: TinyLlavaConfig | None = None, model=None) -> Path:
    """Write a loadable checkpoint (config, safetensors weights, tokenizer, processor) to `out_dir`.

    `model` lets a caller save trained weights with the same tokenizer and processor.
    """
    cfg = cfg or TinyLlavaConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = cfg.vocabulary()
    specials = GEMMA3_SPECIALS if cfg.gemma3 else ONEVISION_SPECIALS if cfg.onevision else None
    processor = build_processor(cfg, build_tokenizer(vocab, specials))
    if model is None:
        model = build_gemma3_model(cfg, len(vocab)) if cfg.gemma3 else build_model(cfg, len(vocab))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info(
        "wrote tiny LLaVA (%d params, vocab %d) to %s",
        sum(p.numel() for p in model.parameters()),
        len(vocab),
        out,
    )
    return out
