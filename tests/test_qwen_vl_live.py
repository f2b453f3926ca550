"""The real server on tiny Qwen2.5-VL / Qwen3-VL checkpoints: a real uvicorn, the engine, a bundle store, httpx and
the official `openai` client. The base answers what HF `generate` answers; concurrent mixed-bundle requests with
different image sizes answer what each answers alone."""

from __future__ import annotations

import base64
import concurrent.futures as futures
import io

import httpx
import pytest
import torch
from api_fakes import LiveServer, wait_until
from pydantic import SecretStr
from qwen_helpers import FAMILIES, load_tiny_qwen, random_image, strong_prompts

from prompts_store.format import save_bundle
from prompts_store.store import BundleStore

VARIANTS = {"alpha": (3, 2, True), "beta": (4, 0, False), "gamma": (0, 3, False), "delta": (2, 2, True)}
SIZES = [(48, 64), (32, 32), (64, 48), (16, 32)]  # (h, w): different token counts and window layouts


def data_uri(height: int, width: int, seed: int) -> str:
    buf = io.BytesIO()
    random_image(height, width, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module", params=FAMILIES)
def live(request, tmp_path_factory):
    from server.app import create_app
    from server.settings import Settings

    model_dir, frozen = load_tiny_qwen(tmp_path_factory, request.param)
    tmp = tmp_path_factory.mktemp(f"{request.param}_store")
    store = BundleStore(tmp / "store")
    for i, (name, variant) in enumerate(VARIANTS.items()):
        save_bundle(tmp / name, strong_prompts(frozen, *variant, seed=i), frozen.spec, name, provenance={})
        store.publish(tmp / name, name)
    settings = Settings(
        model=str(model_dir),
        store=tmp / "store",
        ops_token=SecretStr("ops-token-for-tests"),
        image_cache_size=0,
        max_batch_size=8,
        max_images_per_request=2,
    )
    with LiveServer(create_app(settings)) as server:
        assert wait_until(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=120)
        yield server, frozen


def chat(url, bundle, seed, instruction="what is this digit ?", max_tokens=8, ignore_eos=True):
    h, w = SIZES[seed % len(SIZES)]
    body = {
        "bundle": bundle,
        "instruction": instruction,
        "image": data_uri(h, w, seed),
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
    }
    resp = httpx.post(url + "/v1/chat", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def hf_generate_text(frozen, instruction, seed, max_tokens, seeds=None):
    """What transformers' own `generate` answers for the message the server builds (image parts, then text)."""
    seeds = [seed] if seeds is None else seeds
    parts = [{"type": "image"} for _ in seeds] + [{"type": "text", "text": instruction}]
    text = frozen.processor.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True
    )
    pictures = [random_image(*SIZES[s % len(SIZES)], s) for s in seeds]
    encoded = frozen.processor(images=pictures, text=[text], return_tensors="pt")
    with torch.no_grad():
        out = frozen.model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False)
    tokens = out[0, encoded["input_ids"].shape[1] :].tolist()
    stopped = tokens[-1] == frozen.processor.tokenizer.eos_token_id
    return frozen.processor.tokenizer.decode(
        tokens, skip_special_tokens=True
    ), "stop" if stopped else "length"


def test_base_answers_what_hf_generate_answers(live):
    server, frozen = live
    for seed, instruction in enumerate(["what is this digit ?", "what is this ?", "digit ?", "what ?"]):
        got = chat(server.url, None, seed, instruction, max_tokens=8, ignore_eos=False)
        text, reason = hf_generate_text(frozen, instruction, seed, 8)
        assert got["bundle"] is None and (got["text"], got["finish_reason"]) == (text, reason), (seed, got)
        assert got["text"], "an empty answer would make this comparison weak"


def test_concurrent_mixed_bundle_requests_equal_lone_requests(live):
    server, _ = live
    cases = [(name, i) for i, name in enumerate(VARIANTS)] + [(None, 5), ("alpha", 6), ("gamma", 7)]
    alone = [chat(server.url, bundle, seed) for bundle, seed in cases]
    with futures.ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: chat(server.url, *c), cases))
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["bundle"] for r in together] == [None if b is None else f"{b}@v1" for b, _ in cases]
    assert len({r["text"] for r in alone}) >= 4, (
        "bundles must change the output for this test to mean anything"
    )


def test_openai_client_with_a_bundle(live):
    from openai import OpenAI

    server, _ = live
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(*SIZES[1], 1)}},
                {"type": "text", "text": "what is this digit ?"},
            ],
        }
    ]
    reply = client.chat.completions.create(model="beta", messages=messages, max_tokens=6, temperature=0)
    plain = chat(server.url, "beta", 1, max_tokens=6, ignore_eos=False)  # seed 1: the same image
    assert reply.choices[0].message.content == plain["text"] and plain["text"]
    assert reply.choices[0].finish_reason == plain["finish_reason"]
    assert any(m.id.startswith("beta") for m in client.models.list())


def test_two_images_of_different_sizes_in_one_request_answer_what_hf_generate_answers(live):
    from openai import OpenAI

    server, frozen = live
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    base_id = client.models.list().data[0].id
    seeds = [0, 2]  # 48x64 and 64x48
    content = [{"type": "image_url", "image_url": {"url": data_uri(*SIZES[s], s)}} for s in seeds]
    content.append({"type": "text", "text": "what is this ?"})
    messages = [{"role": "user", "content": content}]
    reply = client.chat.completions.create(model=base_id, messages=messages, max_tokens=8, temperature=0)
    text, reason = hf_generate_text(frozen, "what is this ?", 0, 8, seeds=seeds)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (text, reason) and text
