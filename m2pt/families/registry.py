"""Which HF architectures the core implements, and the gate that refuses the others before weights load.

`FAMILIES` lists the implemented families (add a family's instance here). `KNOWN_UNSUPPORTED` names
architectures people try that the core does not implement yet, so their refusal can say what they are.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from m2pt.families.base import ModelFamily, UnsupportedModelError


def _families() -> list[ModelFamily]:
    from m2pt.families.gemma3 import GEMMA3
    from m2pt.families.llava import LLAVA
    from m2pt.families.llava_next import LLAVA_NEXT
    from m2pt.families.llava_onevision import LLAVA_ONEVISION
    from m2pt.families.qwen_vl import QWEN2_5_VL, QWEN3_VL

    return [LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, GEMMA3, QWEN2_5_VL, QWEN3_VL]


KNOWN_UNSUPPORTED = {
    "Qwen2VLForConditionalGeneration": "Qwen2-VL (M-RoPE, packed-patch ViT)",
    "PaliGemmaForConditionalGeneration": "PaliGemma (prefix-LM mask)",
    "Idefics3ForConditionalGeneration": "Idefics3 (pixel-shuffle connector, image splitting)",
    "Mistral3ForConditionalGeneration": "Mistral 3 (Pixtral ViT, patch merger)",
}


def families() -> list[ModelFamily]:
    """Every implemented family."""
    return _families()


def supported_summary() -> str:
    """One line naming what is supported, for refusal messages."""
    from m2pt.families.llava import SUPPORTED_TEXT_MODELS, SUPPORTED_TOWERS

    archs = ", ".join(a for f in families() for a in f.architectures)
    return (
        f"supported: {archs} (plain LLaVA: towers {', '.join(SUPPORTED_TOWERS)}; "
        f"LLMs {', '.join(SUPPORTED_TEXT_MODELS)})"
    )


def architecture_of(config: Any) -> str:
    """The config's architecture class name (`architectures[0]`, else derived from `model_type`)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return str(archs[0])
    return f"<model_type {getattr(config, 'model_type', None)!r}>"


def family_for_config(config: Any, model_id: str) -> ModelFamily:
    """The family serving `config`, after its config checks; `UnsupportedModelError` (listing what is
    supported) for anything else. Reads nothing but the config."""
    arch = architecture_of(config)
    for family in families():
        if arch in family.architectures:
            try:
                family.check_config(config, model_id)
            except UnsupportedModelError as exc:
                raise UnsupportedModelError(f"{exc}; {supported_summary()}") from None
            return family
    known = KNOWN_UNSUPPORTED.get(arch)
    what = f"{arch} ({known}) is not implemented by m2pt yet" if known else f"{arch} is not a supported model"
    raise UnsupportedModelError(f"{model_id}: {what}; {supported_summary()}")


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a loaded model (by its class name)."""
    name = type(model).__name__
    for family in families():
        if name in family.architectures:
            return family
    raise UnsupportedModelError(f"{name} is not a supported model; {supported_summary()}")
