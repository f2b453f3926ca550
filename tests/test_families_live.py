"""Each supported family behind the real server (uvicorn + engine + store + httpx): base answers equal HF
`generate`, bundles change the answer, a mixed batch equals each request alone; an unsupported checkpoint
exits before `/ready` with the gate's message."""

from __future__ import annotations

import base64
import concurrent.futures as futures
import copy
import io
import os
import subprocess
import sys

import httpx
import pytest
import torch
from api_fakes import LiveServer, _free_port, wait_until
from test_server_live import make_settings, publish

from prompts_store.store import BundleStore

BUNDLES = {"alpha": (3, 2, True), "beta": (0, 3, False), "gamma": (4, 1, True), "delta": (2, 0, False)}
INSTRUCTIONS = ["what is this digit ?", "what digit ?", "is this what ?", "this digit"]


SIZES = [(16, 16), (30, 20), (16, 40), (48, 20), (25, 60)]  # (w, h): any-res families get different grids


def image(seed: int):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    width, height = SIZES[seed % len(SIZES)]
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tiny_config(family: str):
    from training.tiny import gemma3_cfg, interleave_cfg, next_cfg, onevision_cfg

    configs = {
        "siglip-qwen2": interleave_cfg,
        "next-mistral": next_cfg,
        "gemma3": gemma3_cfg,
        "onevision-qwen2": onevision_cfg,
    }
    return configs[family]()


@pytest.fixture(scope="module", params=["siglip-qwen2", "next-mistral", "gemma3", "onevision-qwen2"])
def family_dir(request, tmp_path_factory):
    from training.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp(request.param), tiny_config(request.param))


@pytest.fixture(scope="module")
def frozen(family_dir):
    from m2pt.loading import load_frozen_llava

    return load_frozen_llava(str(family_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(frozen, family_dir, tmp_path_factory):
    from server.app import create_app

    tmp = tmp_path_factory.mktemp("family_store")
    store = BundleStore(tmp / "store")
    for i, (name, variant) in enumerate(BUNDLES.items()):
        publish(store, frozen, tmp, name, variant, seed=i)
    settings = make_settings(family_dir, tmp / "store", max_batch_size=8, image_cache_size=0)
    with LiveServer(create_app(settings)) as live:
        assert wait_until(lambda: httpx.get(live.url + "/ready").status_code == 200, timeout=60)
        yield live


def hf_generate(frozen, instruction: str, img, steps: int) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = frozen.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = frozen.processor(images=[img], text=text, return_tensors="pt")
    config = copy.deepcopy(frozen.model.generation_config)  # `ignore_eos`: EOS is a token like any other
    config.eos_token_id, config.max_new_tokens, config.do_sample = None, steps, False
    with torch.no_grad():
        out = frozen.model.generate(**enc, generation_config=config)
    return frozen.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def chat(url: str, instruction: str, img, bundle: str | None, steps: int = 12) -> dict:
    payload = {"instruction": instruction, "image": b64(img), "max_tokens": steps, "ignore_eos": True}
    if bundle:
        payload["bundle"] = bundle
    resp = httpx.post(f"{url}/v1/chat", json=payload, timeout=120)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["finish_reason"] == "length", body
    return body


def test_base_equals_hf_generate(server, frozen):
    for i, instruction in enumerate(INSTRUCTIONS[:3]):
        got = chat(server.url, instruction, image(i), None)["text"]
        assert got.strip() == hf_generate(frozen, instruction, image(i), 12).strip(), instruction


def test_bundles_change_answers_and_mixed_equals_alone(server):
    jobs = [(name, INSTRUCTIONS[i % 4], image(10 + i)) for i, name in enumerate([*BUNDLES, None])]
    alone = [chat(server.url, ins, img, name)["text"] for name, ins, img in jobs]
    base = [chat(server.url, ins, img, None)["text"] for _, ins, img in jobs]
    assert sum(a != b for a, b in zip(alone[:-1], base[:-1], strict=True)) >= 3, (alone, base)
    with futures.ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(pool.map(lambda job: chat(server.url, job[1], job[2], job[0])["text"], jobs))
    assert mixed == alone


def test_unsupported_checkpoint_exits_before_ready(tmp_path):
    from test_startup_gate import config_qwen2_vl, write_config

    model = write_config(tmp_path / "qwen2vl", config_qwen2_vl())
    cmd = [sys.executable, "-m", "m2pt_cli", "serve", "--model", str(model), "--store", str(tmp_path / "s")]
    cmd += ["--port", str(_free_port()), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "refusing to serve this model" in output and "Qwen2VLForConditionalGeneration (Qwen2-VL" in output
    assert "supported: LlavaForConditionalGeneration" in output


def test_gemma3_under_a_tiny_token_budget_equals_hf_generate(tmp_path):
    """A budget of 2 tokens per step would cut every Gemma 3 image in pieces; the scheduler keeps each image's
    placeholder run in one chunk (`ModelFamily.prefill_spans`), so answers still equal HF `generate`, alone
    and when several requests prefill side by side."""
    from m2pt.loading import load_frozen_llava
    from server.app import create_app
    from training.tiny import build_tiny_llava

    model_dir = build_tiny_llava(tmp_path / "gemma3", tiny_config("gemma3"))
    frozen = load_frozen_llava(str(model_dir), device="cpu", dtype="float32")
    placeholders = frozen.family.prefill_spans(
        frozen.model,
        frozen.processor(images=[image(0)], text=frozen.processor.image_token, return_tensors="pt")[
            "input_ids"
        ][0],
    )
    assert placeholders and placeholders[0][1] - placeholders[0][0] > 2  # the budget really is smaller
    settings = make_settings(model_dir, tmp_path / "store", max_batch_size=2, max_num_batched_tokens=2)
    jobs = [(INSTRUCTIONS[i % 4], image(20 + i)) for i in range(4)]
    want = [hf_generate(frozen, ins, img, 6).strip() for ins, img in jobs]
    with LiveServer(create_app(settings)) as live:
        assert wait_until(lambda: httpx.get(live.url + "/ready").status_code == 200, timeout=60)
        alone = [chat(live.url, ins, img, None, steps=6)["text"].strip() for ins, img in jobs]
        with futures.ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: chat(live.url, *job, None, steps=6)["text"].strip(), jobs))
    assert alone == want and together == want
