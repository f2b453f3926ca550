"""Request and response schemas of the HTTP API (pydantic v2).

- `/v1/chat` (ours): `ChatRequest` is strict (no type coercion) and forbids unknown fields.
- `/v1/chat/completions` (OpenAI): `ChatCompletionRequest` declares every field the official `openai` client
  can send, so the client works unchanged; unknown fields are refused, and fields we cannot honour (n > 1,
  tools, logprobs, penalties, JSON response formats, audio...) are refused with a message naming them instead
  of being silently ignored. Purely informational fields (user, metadata, store, service_tier, cache keys) are
  accepted. Unlike OpenAI, `temperature` defaults to 0 (greedy), so answers are reproducible unless sampling
  is asked for.

Static bounds live here; limits that depend on the server's settings (max_tokens cap, instruction length,
number of images or stop strings) are checked by `server.api.generation` and give the same 400 error shape.
This module builds no engine requests and decodes no images.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
MaxTokens = Annotated[int, Field(ge=1, le=2**31 - 1)]
StopStrings = Annotated[str, Field(min_length=1, max_length=128)] | Annotated[list[str], Field(max_length=64)]
BundleRef = Annotated[str, Field(min_length=1, max_length=200)]


# ----------------------------------------------------------------------------------------------------
# /v1/chat
class ChatRequest(BaseModel):
    """`POST /v1/chat`. `image` is base64 or a data: URI (http(s) URLs only when the server allows them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    bundle: BundleRef | None = None
    instruction: str
    image: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: StopStrings | None = None
    stream: bool = False
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, tests), as vLLM's extension


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ChatResponse(BaseModel):
    """Answer of `POST /v1/chat` (and, field by field, the last chunk of its stream)."""

    id: str
    bundle: str | None
    text: str
    finish_reason: str | None
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------------- OpenAI
class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One OpenAI message. Assistant messages echoed back by clients may carry null `refusal` etc."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _plain_message(self) -> ChatMessage:
        if self.tool_calls or self.function_call is not None or self.audio is not None:
            raise ValueError("tool calls, function calls and audio are not supported by this server")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


# Fields the official client may send that this server cannot honour: each must be absent or neutral.
_UNSUPPORTED = {
    "frequency_penalty": "frequency penalties",
    "presence_penalty": "presence penalties",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "logit_bias": "logit_bias",
    "tools": "tools",
    "functions": "functions",
    "audio": "audio output",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "moderation": "moderation",
    "reasoning_effort": "reasoning_effort",
    "verbosity": "verbosity",
}


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. `model` is a bundle ("name" or "name@version") or the base model's id."""

    model_config = ConfigDict(extra="forbid")

    model: BundleRef
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopStrings | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate exactly max_tokens
    # informational, accepted and ignored
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    prompt_cache_retention: str | None = Field(None, max_length=64)
    prompt_cache_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=64)
    parallel_tool_calls: bool | None = None
    # only neutral values accepted
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    @model_validator(mode="after")
    def _only_supported(self) -> ChatCompletionRequest:
        for name, what in _UNSUPPORTED.items():
            if getattr(self, name):
                raise ValueError(f"{what} ({name}) is not supported by this server; remove '{name}'")
        if self.function_call not in (None, "none", "auto"):
            raise ValueError("function calling is not supported by this server; remove 'function_call'")
        if self.n not in (None, 1):
            raise ValueError("only n=1 is supported; send separate requests for more completions")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported by this server (no tools); remove it")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("only response_format {'type': 'text'} is supported; remove response_format")
        if self.modalities not in (None, ["text"]):
            raise ValueError("only text output is supported; use modalities ['text'] or remove it")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
