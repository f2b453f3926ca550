"""The OpenAI-compatible routes: the official `openai` client against a REAL uvicorn server (fake engine),
plus the message conversion and refusals of fields we cannot honour."""

from __future__ import annotations

import json

import openai
import pytest
from api_fakes import FakeEngine, LiveServer, png_data_uri
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

API_KEY = "chat-key-123456"


@pytest.fixture(scope="module")
def live():
    engine = FakeEngine()
    app = create_app(Settings(api_key=API_KEY, ops_token=None, max_images_per_request=2), engine)
    with LiveServer(app) as server:
        yield server, engine


@pytest.fixture
def oai(live):
    server, engine = live
    engine.queue_full = False
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


def image_message(text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": png_data_uri((24, 8))}},
            ],
        }
    ]


def test_openai_client_chat_completion(oai, live):
    completion = oai.chat.completions.create(
        model="colors", messages=image_message("what color?"), max_tokens=20, temperature=0, seed=1
    )
    assert completion.object == "chat.completion" and completion.model == "colors@v1"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "echo what color? image 24x8"
    assert choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == 7 and completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == 11
    seen = live[1].requests[-1]
    assert seen.bundle == "colors" and seen.sampling.max_tokens == 20 and seen.images[0].size == (24, 8)
    assert seen.messages[-1]["content"] == [{"type": "text", "text": "what color?"}, {"type": "image"}]


def test_openai_client_streaming_matches_and_ends_with_usage(oai):
    plain = oai.chat.completions.create(
        model="fake-base", messages=[{"role": "user", "content": "one two three"}]
    )
    assert plain.model == "fake-base"
    stream = oai.chat.completions.create(
        model="fake-base",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == "echo one two three"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_openai_client_models_list(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["fake-base"]


def test_openai_client_errors_map_to_its_exception_types(oai, live):
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="no-such-bundle", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and "no bundle named 'no-such-bundle'" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "hi"}], n=2)
    assert "only n=1 is supported" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model="fake-base",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "tools (tools) is not supported" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="fake-base", messages=image_message("hi"), extra_body={"top_k": 5})
    assert "top_k: unknown field" in info.value.message
    live[1].queue_full = True
    with pytest.raises(openai.RateLimitError) as info:
        oai.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.headers["retry-after"] == "2"
    live[1].queue_full = False
    bad_key = openai.OpenAI(base_url=oai.base_url, api_key="wrong-key-999", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "hi"}])
    ok = oai.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "still here"}])
    assert ok.choices[0].message.content == "echo still here"


def test_remote_image_urls_are_refused_through_the_client(oai):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
            ],
        }
    ]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="fake-base", messages=messages)
    assert "remote image URLs are disabled" in info.value.message


# ------------------------------------------------------------------------------------------ in-process checks
@pytest.fixture
def client():
    engine = FakeEngine()
    app = create_app(Settings(api_key=None, ops_token=None, max_instruction_chars=100), engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.engine = engine
        yield c


def post(client, **body):
    return client.post("/v1/chat/completions", json={"model": "fake-base", **body})


def test_conversation_is_converted_to_hf_chat_format(client):
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_uri(), "detail": "low"}},
                {"type": "text", "text": "color?"},
            ],
        },
        {"role": "assistant", "content": "red", "refusal": None, "tool_calls": None, "annotations": []},
        {"role": "user", "content": "and the shape?", "name": "ann"},
    ]
    resp = post(
        client,
        messages=messages,
        max_completion_tokens=9,
        max_tokens=3,
        user="u1",
        store=False,
        metadata={"k": "v"},
        frequency_penalty=0,
        logprobs=False,
        response_format={"type": "text"},
        tool_choice="none",
        n=1,
    )
    assert resp.status_code == 200, resp.text
    seen = client.engine.requests[-1]
    assert seen.messages == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "and the shape?"}]},
    ]
    assert len(seen.images) == 1 and seen.sampling.max_tokens == 9  # max_completion_tokens wins
    assert seen.sampling.ignore_eos is False


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message must be the user's"),
        ({"messages": [{"role": "user", "content": ""}]}, "the last user message's text is empty"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, "101 characters, over the limit of 100"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "does not match any of the expected tags",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": png_data_uri()}},
                            {"type": "image_url", "image_url": {"url": png_data_uri()}},
                        ],
                    }
                ]
            },
            "2 images in one request, over the limit of 1",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            "max_tokens: Input should be greater",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "over this server's limit"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
            "logprobs (logprobs) is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
            "only response_format",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "hi"}], "guided_json": {}}, "guided_json: unknown field"),
    ],
)
def test_bad_openai_requests_are_400_and_the_next_works(client, body, fragment):
    resp = post(client, **body)
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["error"]["message"]
    assert post(client, messages=[{"role": "user", "content": "ok"}]).status_code == 200


def test_lone_surrogates_are_400(client):
    raw = (
        b'{"model": "fake-base", "messages": [{"role": "system", "content": "\\ud800"}, '
        b'{"role": "user", "content": "hi"}]}'
    )
    resp = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert (
        resp.status_code == 400
        and "messages[0] text contains invalid Unicode" in resp.json()["error"]["message"]
    )


def test_streaming_sse_format(client):
    resp = post(client, messages=[{"role": "user", "content": "a b"}], stream=True)
    blocks = [b for b in resp.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]" and all(b.startswith("data: ") for b in blocks)
    chunks = [json.loads(b[6:]) for b in blocks[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "echo"},
        {"content": " a"},
        {"content": " b"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "stop"]
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
