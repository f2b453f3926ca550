"""LLaVA-OneVision's processor without torchvision: images only.

Under transformers 5.x `AutoProcessor` for `llava_onevision` also builds the video processor, which imports
torchvision (not installed here: the registry's wheels pull a second torch). The image side needs none:
`LlavaOnevisionImageProcessorPil` gives the same tiles, `image_sizes` and `batch_num_images`. So the family's
processor class is built with the PIL image processor + the tokenizer and no video processor; a call with
`videos=` raises `ValueError` (the server turns it into a 400).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the processor's own settings (processor_config.json) that decide the placeholder count
PROCESSOR_KEYS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token")


def image_only_processor_class() -> type:
    """A `LlavaOnevisionProcessor` subclass whose only sub-processors are the image processor and tokenizer."""
    from transformers import LlavaOnevisionProcessor

    class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        """`LlavaOnevisionProcessor` with `video_processor = None`; `videos=` is refused."""

        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor: Any, tokenizer: Any, **kwargs: Any) -> None:
            kwargs.pop("video_processor", None)
            super().__init__(image_processor, tokenizer, None, **kwargs)
            self.video_processor = None

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("videos") is not None:
                raise ValueError("videos are not supported for LLaVA-OneVision by m2pt (images only)")
            return super().__call__(*args, **kwargs)

    return ImageOnlyLlavaOnevisionProcessor


def build_image_only_processor(image_processor: Any, tokenizer: Any, **settings: Any) -> Any:
    """The image-only processor from its parts (`settings`: `PROCESSOR_KEYS`, `chat_template`)."""
    return image_only_processor_class()(image_processor, tokenizer, **settings)


def _from_model_config(path: Path) -> dict[str, Any]:
    """The placeholder settings implied by the model's config.json (what the HF processor would be saved with)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    vision = config.get("vision_config", {})
    out: dict[str, Any] = {}
    if "image_size" in vision and "patch_size" in vision:
        out["num_image_tokens"] = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    for key in ("vision_feature_select_strategy", "vision_aspect_ratio"):
        if key in config:
            out[key] = config[key]
    return out


def _settings(path: Path, tokenizer: Any) -> dict[str, Any]:
    """Saved processor settings win; missing ones come from the model config."""
    settings = _from_model_config(path)
    config_file = path / "processor_config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        settings.update({k: saved[k] for k in PROCESSOR_KEYS if k in saved})
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        settings["chat_template"] = jinja.read_text()
    elif (path / "chat_template.json").is_file():
        settings["chat_template"] = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    else:
        settings["chat_template"] = getattr(tokenizer, "chat_template", None)
    return settings


def load_processor(name_or_path: str) -> Any:
    """Tokenizer + PIL image processor + the processor's settings from a local checkpoint directory."""
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(name_or_path)
    return build_image_only_processor(image_processor, tokenizer, **_settings(Path(name_or_path), tokenizer))
