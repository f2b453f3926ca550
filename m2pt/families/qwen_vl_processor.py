"""Qwen2.5-VL / Qwen3-VL processors without torchvision: the family's own processor class, images only.

Under transformers 5.x `AutoProcessor` for these families also builds a video processor, which imports torchvision;
torchvision is not installed here (and must not be: the registry's wheels pull a second torch). The image side needs
no torchvision: `Qwen2VLImageProcessorPil` gives the same pixels and `image_grid_thw`. So we build the family's
processor class with the PIL image processor + the tokenizer and no video processor; videos are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROCESSOR_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def image_only_processor_class(family: str) -> type:
    """A subclass of the family's processor whose only sub-processors are the image processor and tokenizer."""
    import transformers

    if family not in PROCESSOR_CLASSES:
        raise ValueError(
            f"no Qwen-VL processor for model_type {family!r}; known: {sorted(PROCESSOR_CLASSES)}"
        )
    base = getattr(transformers, PROCESSOR_CLASSES[family])

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        """The family's processor with `video_processor = None` (calls with `videos=` raise)."""

        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)
            self.video_processor = None

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


def build_image_only_processor(
    family: str, image_processor: Any, tokenizer: Any, chat_template: str | None
) -> Any:
    return image_only_processor_class(family)(image_processor, tokenizer, chat_template=chat_template)


def _chat_template(path: Path, tokenizer: Any) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    json_file = path / "chat_template.json"
    if json_file.is_file():
        import json

        return json.loads(json_file.read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def load_processor(name_or_path: str, family: str) -> Any:
    """Load tokenizer + PIL image processor from a local checkpoint directory, as the family's processor class."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
    template = _chat_template(Path(name_or_path), tokenizer)
    return build_image_only_processor(family, image_processor, tokenizer, template)
