"""Turn a `GenerationRequest` into a `PreparedRow` — chat template, token ids with expanded image placeholders,
pixel values, image content hashes — and refuse, BEFORE it is queued, every input the model cannot take.
Runs in a worker thread, never in the engine loop.

Refused with `InvalidRequestError` (400), each with a message that says what to change:
- image parts in a message whose role is not "user" (the chat templates show images in user turns only);
- the literal image placeholder text (e.g. "<image>") in any message text: it is refused, not treated as text,
  because the tokenizer would turn it into a placeholder token with no image behind it. Images go in image
  parts;
- a different number of image parts than images;
- anything the model's processor refuses (its message is passed on, shortened);
- a prompt whose image placeholder tokens do not match the images' feature rows;
and with `PromptTooLongError` (400) a prompt + bundle prefix + max_tokens over the model's context.
"""

from __future__ import annotations

import hashlib
import math

from jinja2 import TemplateError

from server.engine.errors import InvalidRequestError, PromptTooLongError
from server.engine.types import GenerationRequest, PreparedRow

MAX_QUOTED = 200


def image_content_hash(image) -> str:
    """sha256 of a PIL image's mode, size and pixels: equal pictures share cache entries whatever their encoding."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def iter_parts(messages: list[dict]):
    """(message index, role, part dict) of every list-content part; string content counts as one text part."""
    for index, message in enumerate(messages):
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if isinstance(part, dict):
                yield index, message.get("role"), part


def count_image_parts(messages: list[dict]) -> int:
    return sum(1 for _, _, part in iter_parts(messages) if part.get("type") == "image")


def check_messages(messages: list[dict], n_images: int, image_token: str) -> None:
    """The checks that need no tokenizer (see the module docstring)."""
    for index, role, part in iter_parts(messages):
        if part.get("type") == "image" and role != "user":
            raise InvalidRequestError(
                f"messages[{index}] ({role}) has an image; images are accepted in user messages only"
            )
        if part.get("type") == "text" and image_token and image_token in str(part.get("text", "")):
            raise InvalidRequestError(
                f"messages[{index}] text contains {image_token!r}, the model's image placeholder; remove it "
                "(send images as image parts, not as placeholder text)"
            )
    n_parts = count_image_parts(messages)
    if n_parts != n_images:
        raise InvalidRequestError(f"{n_parts} image parts in the messages but {n_images} images given")


class Preprocessor:
    """Tokenisation with the served model's own processor (so serving matches training)."""

    def __init__(self, frozen, encode_cost_per_placeholder: float | None = None) -> None:
        """`encode_cost_per_placeholder`: what an image encode costs per placeholder in prompt tokens of the step
        budget (`m2pt.calibrate`; None: one per placeholder)."""
        self.processor = frozen.processor
        self.family = getattr(frozen, "family", None)  # m2pt.families adapter, when the loader attached one
        self.model = frozen.model
        self.image_token_id = int(frozen.spec.image_token_id)
        self.tokens_per_image = int(frozen.spec.num_image_tokens)
        self.encode_cost_per_placeholder = encode_cost_per_placeholder
        self.image_token = str(getattr(self.processor, "image_token", "") or "")
        text_config = frozen.model.config.text_config
        self.max_positions = int(getattr(text_config, "max_position_embeddings", 1 << 30))
        eos = frozen.model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(
            int(e) for e in [*eos_list, self.processor.tokenizer.eos_token_id] if e is not None
        )

    def prepare(self, request: GenerationRequest, entry) -> PreparedRow:
        """Raises `InvalidRequestError` or `PromptTooLongError` (see the module docstring)."""
        check_messages(request.messages, len(request.images), self.image_token)
        input_ids, pixel_values, images = self._tokenize(request)
        n_slots = int((input_ids == self.image_token_id).sum())
        # LLaVA: a fixed number of placeholders per image; other families: at least one per image
        expected = len(request.images) * self.tokens_per_image if self.family is None else None
        if (expected is not None and n_slots != expected) or (bool(n_slots) != bool(request.images)):
            raise InvalidRequestError(
                f"the prompt has {n_slots} image placeholder tokens, which {len(request.images)} image(s) "
                "cannot fill; send one image part per image"
            )
        prefix = None if entry is None else entry.prefix
        self._check_length(int(input_ids.shape[0]), 0 if prefix is None else prefix.text_len, request)
        return PreparedRow(
            request_id=request.request_id,
            input_ids=input_ids,
            pixel_values=None,
            images=images,
            image_keys=[image_content_hash(img) for img in request.images],
            prefix=prefix,
            bundle_key="base" if entry is None else entry.content_hash,
            num_image_tokens=n_slots,
            atomic_spans=self._atomic_spans(input_ids),
            encode_cost=self._encode_cost(n_slots),
        )

    def _encode_cost(self, n_slots: int) -> int | None:
        """The images' encode in step-budget tokens (at least 1 when there are images); None: the scheduler
        counts the placeholders."""
        if self.encode_cost_per_placeholder is None or not n_slots:
            return None
        return max(1, math.ceil(n_slots * self.encode_cost_per_placeholder))

    def _atomic_spans(self, input_ids) -> tuple[tuple[int, int], ...]:
        """The family's token ranges that one prefill chunk must hold whole (`ModelFamily.prefill_spans`)."""
        spans = getattr(self.family, "prefill_spans", None)
        return tuple(spans(self.model, input_ids)) if spans is not None else ()

    def _tokenize(self, request: GenerationRequest):
        try:
            text = self.processor.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            if request.images:
                encoded = self.processor(images=request.images, text=text, return_tensors="pt")
                split = getattr(self.family, "split_images", None)
                images = list(split(encoded)) if split is not None else None
                return encoded["input_ids"][0], encoded["pixel_values"], images  # [T], [n_images, 3, H, W]
            return self.processor.tokenizer(text, return_tensors="pt")["input_ids"][0], None, None
        except (ValueError, TypeError, KeyError, IndexError, TemplateError) as exc:
            detail = str(exc).splitlines()[0][:MAX_QUOTED] if str(exc) else type(exc).__name__
            raise InvalidRequestError(f"the model's processor refused this input: {detail}") from exc

    def _check_length(self, n_tokens: int, prefix_len: int, request: GenerationRequest) -> None:
        needed = prefix_len + n_tokens + request.sampling.max_tokens
        if needed > self.max_positions:
            raise PromptTooLongError(
                f"prompt ({n_tokens} tokens) + bundle prefix ({prefix_len}) + max_tokens "
                f"({request.sampling.max_tokens}) = {needed} exceeds the model's context of {self.max_positions}; "
                "shorten the instruction or lower max_tokens"
            )
