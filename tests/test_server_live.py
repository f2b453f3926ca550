"""The real server end to end: a real uvicorn, the real engine on the tiny model, a real bundle store, httpx and the
official `openai` client. Mixed-bundle batching is checked against lone requests; failure paths against status
codes, messages and metrics."""

from __future__ import annotations

import concurrent.futures as futures
import json

import httpx
import pytest
from api_fakes import LiveServer, png_data_uri, wait_until
from prompt_helpers import strong_prompts
from pydantic import SecretStr

from prompts_store.format import save_bundle
from prompts_store.store import BundleStore

OPS = "ops-token-for-tests"
VARIANTS = {
    "alpha": (3, 2, True),
    "beta": (4, 0, False),
    "gamma": (0, 3, False),
    "delta": (2, 2, True),
    "eps": (5, 1, True),
}


def publish(store: BundleStore, tiny, tmp_path, name: str, variant, seed: int) -> str:
    src = tmp_path / f"src-{name}-{seed}"
    save_bundle(
        src, strong_prompts(tiny, *variant, seed=seed), tiny.spec, name, provenance={"dataset": "test"}
    )
    return store.publish(src, name).label


def make_settings(model_dir, store_dir, **overrides):
    from server.settings import Settings

    return Settings(
        model=str(model_dir), store=store_dir, ops_token=SecretStr(OPS), max_tokens_limit=400, **overrides
    )


@pytest.fixture(scope="module")
def store_dir(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live_store")
    store = BundleStore(tmp / "store")
    for i, (name, variant) in enumerate(VARIANTS.items()):
        publish(store, tiny, tmp, name, variant, seed=i)
    return tmp / "store"


@pytest.fixture(scope="module")
def live(tiny_model_dir, store_dir):
    from server.app import create_app

    with LiveServer(create_app(make_settings(tiny_model_dir, store_dir, max_batch_size=8))) as server:
        assert wait_until(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=60)
        yield server


def chat(url, bundle, seed, **extra):
    body = {
        "bundle": bundle,
        "instruction": "what is this digit ?",
        "image": png_data_uri((16 + seed, 16)),
        "max_tokens": 12,
        **extra,
    }
    return httpx.post(url + "/v1/chat", json=body, timeout=60)


def test_concurrent_mixed_bundle_requests_equal_lone_requests(live):
    cases = [(name, i) for i, name in enumerate(VARIANTS)] + [(None, 7), ("alpha", 8), ("gamma", 9)]
    alone = [chat(live.url, bundle, seed).json() for bundle, seed in cases]
    with futures.ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: chat(live.url, *c).json(), cases))
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["bundle"] for r in together] == [None if b is None else f"{b}@v1" for b, _ in cases]
    assert len({r["text"] for r in alone}) >= 4, (
        "bundles must change the output for this test to mean anything"
    )
    metrics = httpx.get(live.url + "/metrics").text
    assert 'm2pt_generated_tokens_total{bundle="alpha@v1"}' in metrics


def test_streaming_and_non_streaming_give_the_same_text(live):
    plain = chat(live.url, "beta", 3).json()
    with httpx.stream(
        "POST",
        live.url + "/v1/chat",
        json={
            "bundle": "beta",
            "instruction": "what is this digit ?",
            "image": png_data_uri((19, 16)),
            "max_tokens": 12,
            "stream": True,
        },
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["finish_reason"] == plain["finish_reason"]


def test_openai_client_streaming_matches_non_streaming(live):
    from openai import OpenAI

    client = OpenAI(base_url=live.url + "/v1", api_key="unused")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_uri((20, 16))}},
                {"type": "text", "text": "what is this digit ?"},
            ],
        }
    ]
    full = client.chat.completions.create(model="delta", messages=messages, max_tokens=10, temperature=0)
    pieces = client.chat.completions.create(
        model="delta", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == full.choices[0].message.content
    models = {m.id for m in client.models.list()}
    assert set(VARIANTS) <= models


def test_unknown_bundle_is_404_never_the_base_model(live):
    resp = chat(live.url, "no-such-bundle", 1)
    assert resp.status_code == 404
    assert "no-such-bundle" in resp.json()["error"]["message"]
    resp = httpx.post(
        live.url + "/v1/chat/completions",
        json={"model": "alpha@v99", "messages": [{"role": "user", "content": "what is this digit ?"}]},
        timeout=30,
    )
    assert resp.status_code == 404
    assert "v99" in resp.json()["error"]["message"] and "alpha" in resp.json()["error"]["message"]
    assert chat(live.url, "alpha", 1).status_code == 200  # and the server goes on serving


def test_metrics_reflect_the_traffic(live):
    before = httpx.get(live.url + "/metrics").text
    for seed in range(3):
        assert chat(live.url, "eps", seed).status_code == 200
    after = httpx.get(live.url + "/metrics").text

    def value(text, prefix):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    assert (
        value(after, 'm2pt_engine_finished_total{bundle="eps@v1"')
        - value(before, 'm2pt_engine_finished_total{bundle="eps@v1"')
        == 3
    )
    assert (
        value(after, "m2pt_time_to_first_token_seconds_count")
        >= value(before, "m2pt_time_to_first_token_seconds_count") + 3
    )
    assert value(after, "m2pt_bundle_loads_total") >= 1
    assert "m2pt_queue_depth" in after and "m2pt_running_batch_size" in after


# ---------------------------------------------------------------- a server with one slot and a queue of one
@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory):
    """The tiny architecture with a 64k context: one request outlasts the test's other steps on any machine (the
    test hangs up long before it would end)."""
    from training.tiny import TinyLlavaConfig, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_long"), TinyLlavaConfig(max_positions=65536))


@pytest.fixture()
def tight(long_context_model_dir, tmp_path):
    from server.app import create_app

    settings = make_settings(long_context_model_dir, tmp_path / "store", max_batch_size=1, max_queue=1)
    settings = settings.model_copy(update={"max_tokens_limit": 64000})
    with LiveServer(create_app(settings)) as server:
        assert wait_until(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=60)
        yield server


LONG = {"instruction": "what is this digit ?", "max_tokens": 400, "ignore_eos": True, "stream": True}
VERY_LONG = {**LONG, "max_tokens": 60000}


def finished(url, reason):
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("m2pt_engine_finished_total") and f'reason="{reason}"' in line
    )


def test_client_disconnect_frees_its_slot(tight):
    with httpx.stream("POST", tight.url + "/v1/chat", json=VERY_LONG, timeout=60) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())  # one chunk, then hang up
    assert wait_until(lambda: finished(tight.url, "abort") == 1, timeout=20)
    assert finished(tight.url, "length") == 0  # it did not run to the end
    resp = chat(tight.url, None, 2)  # the single slot is free again
    assert resp.status_code == 200


def test_full_queue_answers_429_with_retry_after(tight):
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", tight.url + "/v1/chat", json=VERY_LONG) as first,
    ):
        lines = first.iter_lines()  # keep the iterator: a dropped one closes the connection
        next(lines)  # the request runs: it occupies the one slot
        with futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(
                lambda: chat(tight.url, None, 1, max_tokens=3)
            )  # waits in the one queue place
            assert wait_until(
                lambda: "m2pt_queue_depth 1.0" in httpx.get(tight.url + "/metrics").text, timeout=20
            )
            rejected = chat(tight.url, None, 2)
            assert rejected.status_code in (429, 503)
            assert rejected.headers["retry-after"].isdigit()
            assert "retry" in rejected.json()["error"]["message"].lower()
            lines.close()
            first.close()
            assert queued.result().status_code == 200


# ---------------------------------------------------------------- hot swap and delete through the ops API
def upload(url, bundle_dir, name=None):
    files = {
        "manifest": ("manifest.json", (bundle_dir / "manifest.json").read_bytes(), "application/json"),
        "tensors": (
            "tensors.safetensors",
            (bundle_dir / "tensors.safetensors").read_bytes(),
            "application/octet-stream",
        ),
    }
    data = {"name": name} if name else {}
    return httpx.post(
        url + "/v1/bundles", files=files, data=data, headers={"Authorization": f"Bearer {OPS}"}, timeout=60
    )


def long_chat_in_background(pool, url, bundle):
    def run():
        body = {**LONG, "bundle": bundle, "max_tokens": 300}
        text, last = "", None
        with httpx.stream("POST", url + "/v1/chat", json=body, timeout=120) as resp:
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line[6:])
                    text += last.get("text", "")
        return text, last

    return pool.submit(run)


def test_upload_v2_while_a_v1_request_runs(live, tiny, tmp_path):
    v1_dir, v2_dir = tmp_path / "v1", tmp_path / "v2"
    save_bundle(v1_dir, strong_prompts(tiny, 3, 2, True, seed=40), tiny.spec, "swap")
    save_bundle(v2_dir, strong_prompts(tiny, 3, 2, True, seed=41), tiny.spec, "swap")
    assert upload(live.url, v1_dir).status_code == 201
    lone_v1 = httpx.post(
        live.url + "/v1/chat",
        json={**LONG, "bundle": "swap", "max_tokens": 300, "stream": False},
        timeout=120,
    ).json()["text"]
    with futures.ThreadPoolExecutor(1) as pool:
        running = long_chat_in_background(pool, live.url, "swap")
        assert wait_until(
            lambda: "m2pt_running_batch_size 1.0" in httpx.get(live.url + "/metrics").text, timeout=20
        )
        resp = upload(live.url, v2_dir)
        assert resp.status_code == 201, resp.text
        new = chat(live.url, "swap", 5)
        assert new.json()["bundle"] == "swap@v2"
        text, last = running.result()
    assert last["bundle"] == "swap@v1" and last["finish_reason"] == "length"
    assert text == lone_v1  # the in-flight request finished on v1's prefix


def test_delete_while_a_request_uses_the_bundle(live, tiny, tmp_path):
    src = tmp_path / "doomed"
    save_bundle(src, strong_prompts(tiny, 2, 1, False, seed=50), tiny.spec, "doomed")
    assert upload(live.url, src).status_code == 201
    with futures.ThreadPoolExecutor(1) as pool:
        running = long_chat_in_background(pool, live.url, "doomed")
        assert wait_until(
            lambda: "m2pt_running_batch_size 1.0" in httpx.get(live.url + "/metrics").text, timeout=20
        )
        resp = httpx.delete(
            live.url + "/v1/bundles/doomed", headers={"Authorization": f"Bearer {OPS}"}, timeout=30
        )
        assert resp.status_code == 200, resp.text
        after = chat(live.url, "doomed", 1)
        assert after.status_code == 404
        text, last = running.result()
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 300


def test_twenty_concurrent_uploads_lose_nothing(live, tiny, tmp_path):
    dirs = []
    for i in range(20):
        save_bundle(tmp_path / f"u{i}", strong_prompts(tiny, 2, 1, False, seed=100 + i), tiny.spec, "many")
        dirs.append(tmp_path / f"u{i}")
    with futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda d: upload(live.url, d), dirs))
    assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers if a.status_code != 201]
    versions = {a.json()["version"] for a in answers}
    assert len(versions) == 20
    listing = httpx.get(live.url + "/v1/bundles/many", headers={"Authorization": f"Bearer {OPS}"}).json()
    assert len(listing["versions"]) == 20
    for version in sorted(versions)[:3]:
        assert chat(live.url, f"many@{version}", 1).status_code == 200


# ---------------------------------------------------------------- inputs the model cannot take: 400 before queueing
def test_image_placeholder_text_is_400_and_a_running_stream_is_untouched(live):
    """The issue-8 attack: "<image> hi" (no image, or one image), 16 at once, while a stream runs: every one is
    a 400 that names the problem, the stream ends with exactly the text it has alone."""
    body = {"instruction": "what is this digit ?", "image": png_data_uri((23, 16)), "max_tokens": 40}
    body |= {"ignore_eos": True, "stream": True}

    def stream_text():
        with httpx.stream("POST", live.url + "/v1/chat", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            chunks = [json.loads(x[6:]) for x in resp.iter_lines() if x.startswith("data: {")]
        assert chunks[-1]["finish_reason"] == "length"
        return "".join(c["text"] for c in chunks)

    alone = stream_text()
    with futures.ThreadPoolExecutor(17) as pool:
        running = pool.submit(stream_text)
        attacks = [
            pool.submit(
                lambda i: httpx.post(
                    live.url + "/v1/chat",
                    json={"instruction": "<image> hi", **({"image": png_data_uri()} if i % 2 else {})},
                    timeout=60,
                ),
                i,
            )
            for i in range(16)
        ]
        answers = [a.result() for a in attacks]
        assert running.result() == alone
    for resp in answers:
        assert resp.status_code == 400, resp.text
        assert "'<image>'" in resp.json()["error"]["message"]
    assert finished(live.url, "error") == 0


@pytest.mark.parametrize(
    "messages, needle",
    [
        (
            [
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "IMG"}}]},
                {"role": "user", "content": "what is this digit ?"},
            ],
            "user messages only",
        ),
        ([{"role": "user", "content": "what <image> is this ?"}], "'<image>'"),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "<image>"}],
                }
            ],
            "'<image>'",
        ),
    ],
)
def test_openai_inputs_the_model_cannot_take_are_400(live, messages, needle):
    for message in messages:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    part["image_url"]["url"] = png_data_uri()
    resp = httpx.post(
        live.url + "/v1/chat/completions", json={"model": "alpha", "messages": messages}, timeout=60
    )
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"]
