"""Turn a `GenerationRequest` into model inputs: chat template → token ids with expanded image placeholders,
pixel values, image content hashes, and the length check. Runs in a worker thread, never in the decode loop."""

from __future__ import annotations

import hashlib

from server.engine.errors import InvalidRequestError, PromptTooLongError
from server.engine.runner import PreparedRow
from server.engine.types import GenerationRequest


def image_content_hash(image) -> str:
    """sha256 of a PIL image's mode, size and pixels: equal pictures share cache entries whatever their encoding."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def count_image_parts(messages: list[dict]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


class Preprocessor:
    """Tokenisation with the served model's own processor (so serving matches training)."""

    def __init__(self, frozen) -> None:
        self.processor = frozen.processor
        self.family = frozen.family
        text_config = frozen.model.config.text_config
        self.max_positions = int(getattr(text_config, "max_position_embeddings", 1 << 30))
        eos = frozen.model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(
            int(e) for e in [*eos_list, self.processor.tokenizer.eos_token_id] if e is not None
        )

    def prepare(self, request: GenerationRequest, entry) -> PreparedRow:
        """Raises `InvalidRequestError` (image parts ≠ images) or `PromptTooLongError` (context overflow)."""
        n_parts = count_image_parts(request.messages)
        if n_parts != len(request.images):
            raise InvalidRequestError(
                f"{n_parts} image parts in the messages but {len(request.images)} images given"
            )
        text = self.processor.apply_chat_template(
            request.messages, add_generation_prompt=True, tokenize=False
        )
        if request.images:
            encoded = self.processor(images=request.images, text=text, return_tensors="pt")
            images = self.family.split_images(encoded)  # one ImageInput per image, the family's layout
        else:
            encoded = self.processor.tokenizer(text, return_tensors="pt")
            images = []
        input_ids = encoded["input_ids"][0]  # [T]
        prefix = None if entry is None else entry.prefix
        prefix_len = 0 if prefix is None else prefix.text_len
        needed = prefix_len + int(input_ids.shape[0]) + request.sampling.max_tokens
        if needed > self.max_positions:
            raise PromptTooLongError(
                f"prompt ({input_ids.shape[0]} tokens) + bundle prefix ({prefix_len}) + max_tokens "
                f"({request.sampling.max_tokens}) = {needed} exceeds the model's context of {self.max_positions}; "
                "shorten the instruction or lower max_tokens"
            )
        return PreparedRow(
            request_id=request.request_id,
            input_ids=input_ids,
            pixel_values=None,
            images=images,
            image_keys=[image_content_hash(img) for img in request.images],
            prefix=prefix,
            bundle_key="base" if entry is None else entry.content_hash,
        )
