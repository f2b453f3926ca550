"""The Ray Serve cluster end to end (`m2pt serve --replicas 2`), marked `cluster` (not in the default run).

The cluster runs in a loopback-only network namespace (Ray's ports bind every interface), as a child process
that serves over a Unix socket; this test process talks to it through that socket with httpx and the official
`openai` client, and runs the single-process server on the same tiny model and the SAME store directory on
the host's loopback for comparison. Without root/unshare the tests fail (they never skip).
Covered: answers equal the single-process server's (temperature 0, /v1/chat, streamed and OpenAI);
errors are our JSON; bundle affinity (one load per bundle when sequential; at most `max_holders` replicas per
bundle under concurrency); an upload through the ingress is served at once by both replicas, a new version
replaces the old under its name, a delete answers 404 at once; SIGKILL of a replica under load (failures are
our errors, the cluster is back to 2 replicas and serves).
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import os
import re
import signal
import time

import httpx
import pytest
from api_fakes import LiveServer, png_b64, png_data_uri, wait_until
from prompt_helpers import strong_prompts
from pydantic import SecretStr

from prompts_store.format import save_bundle
from prompts_store.store import BundleStore

pytestmark = pytest.mark.cluster

OPS = "ops-token-for-cluster-tests"
BUNDLES = {f"b{i}": (3, 2, i % 2 == 0) for i in range(6)}
SERVE_FLAGS = ["--max-batch-size", "8", "--max-queue", "32", "--max-tokens-limit", "64", "--device", "cpu"]


def _write_bundle(tiny, tmp, name: str, seed: int):
    src = tmp / f"src-{name}-{seed}"
    save_bundle(src, strong_prompts(tiny, *BUNDLES.get(name, (3, 2, True)), seed=seed), tiny.spec, name)
    return src


@pytest.fixture(scope="module")
def shared_store(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster_store")
    store = BundleStore(tmp / "store")
    for i, name in enumerate(BUNDLES):
        store.publish(_write_bundle(tiny, tmp, name, seed=i), name)
    return tmp


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, shared_store):
    from server.cluster.netns import ClusterProcess, NetnsUnavailable

    sock = str(shared_store / "ingress.sock")
    env = dict(os.environ, M2PT_OPS_TOKEN=OPS, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    flags = ["--replicas", "2", "--model", str(tiny_model_dir), "--store", str(shared_store / "store")]
    try:
        proc = ClusterProcess([*flags, *SERVE_FLAGS], sock, str(shared_store / "cluster.log"), env).start()
    except NetnsUnavailable as exc:
        pytest.fail(f"cluster tests need a loopback-only network namespace: {exc}")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://cluster", timeout=60)
    try:
        ready = wait_until(lambda: _ready(client), timeout=240)
        assert ready, "cluster not ready in 240 s:\n" + (shared_store / "cluster.log").read_text()[-4000:]
        yield proc, client
    finally:
        client.close()
        leftover = proc.stop()
        assert leftover == [], f"processes left after shutdown (killed): {leftover}"


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/ready").status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def single(tiny_model_dir, shared_store):
    from server.app import create_app
    from server.settings import Settings

    settings = Settings(
        model=str(tiny_model_dir),
        store=shared_store / "store",
        ops_token=SecretStr(OPS),
        max_tokens_limit=64,
        max_batch_size=8,
        device="cpu",
    )
    with LiveServer(create_app(settings)) as server:
        assert wait_until(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=60)
        yield httpx.Client(base_url=server.url, timeout=60)


def _chat(client: httpx.Client, bundle: str | None, text: str, **extra) -> httpx.Response:
    body = {"instruction": text, "image": png_b64((16, 16)), "max_tokens": 8, "temperature": 0, **extra}
    if bundle is not None:
        body["bundle"] = bundle
    return client.post("/v1/chat", json=body)


def _metrics(client: httpx.Client) -> str:
    return client.get("/metrics").text


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            out.append((labels, float(match.group(2))))
    return out


def _residency(client: httpx.Client) -> dict[str, set[str]]:
    """bundle label -> replicas it is resident on (from the ingress's aggregated metrics)."""
    where: dict[str, set[str]] = {}
    for labels, _ in _samples(_metrics(client), "m2pt_cluster_bundle_resident"):
        where.setdefault(labels["bundle"], set()).add(labels["replica"])
    return where


def _wait_reported(client: httpx.Client, predicate, timeout: float = 15) -> bool:
    return wait_until(lambda: predicate(_residency(client)), timeout=timeout)


def test_answers_equal_single_process_server(cluster, single):
    _, client = cluster
    for bundle in [None, *BUNDLES]:
        for text in ("what is this", "describe the image"):
            ours, theirs = _chat(client, bundle, text), _chat(single, bundle, text)
            assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
            a, b = ours.json(), theirs.json()
            assert (a["text"], a["bundle"], a["finish_reason"], a["usage"]) == (
                b["text"],
                b["bundle"],
                b["finish_reason"],
                b["usage"],
            )
    streamed = _chat(client, "b1", "what is this", stream=True)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert "".join(c["text"] for c in chunks) == _chat(single, "b1", "what is this").json()["text"]


def test_openai_client_through_the_cluster(cluster, single):
    from openai import OpenAI

    proc, _ = cluster
    http = httpx.Client(transport=httpx.HTTPTransport(uds=proc.uds), timeout=60)
    ours = OpenAI(base_url="http://cluster/v1", api_key="unused", http_client=http)
    theirs = OpenAI(base_url=str(single.base_url) + "/v1", api_key="unused")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_uri()}},
                {"type": "text", "text": "what is this"},
            ],
        }
    ]
    assert {m.id for m in ours.models.list()} == {m.id for m in theirs.models.list()}
    for model in ("b2", "b3@v1"):
        a = ours.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        b = theirs.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage.completion_tokens == b.usage.completion_tokens


def test_errors_are_our_json(cluster):
    _, client = cluster
    missing = _chat(client, "no-such-bundle", "hi")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "bundle_not_found"
    assert "no-such-bundle" in missing.json()["error"]["message"]
    bad = client.post("/v1/chat", json={"instruction": "hi", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"
    nowhere = client.get("/v2/nothing")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "not_found"
    no_token = client.get("/v1/bundles")
    assert no_token.status_code == 401 and no_token.json()["error"]["type"] == "unauthorized"


def _routed(client: httpx.Client, labels: set[str]) -> tuple[float, float]:
    """(requests, requests that found their bundle resident) over every replica, for bundles in `labels`."""
    routed = _samples(_metrics(client), "m2pt_replica_cluster_routed_requests_total")
    mine = [(lab, v) for lab, v in routed if lab["bundle"] in labels]
    return sum(v for _, v in mine), sum(v for lab, v in mine if lab["resident"] == "true")


def test_affinity_one_load_per_bundle_and_bounded_spread(cluster):
    _, client = cluster
    labels = {f"{b}@v1" for b in BUNDLES}
    time.sleep(3)  # let the replicas report what earlier tests sent
    before_total, before_hits = _routed(client, labels)
    for _ in range(3):  # sequential: every bundle stays on its rendezvous home
        for bundle in BUNDLES:
            assert _chat(client, bundle, "what is this").status_code == 200
    assert _wait_reported(client, lambda r: labels <= set(r))
    residency = _residency(client)
    assert all(len(residency[label]) == 1 for label in labels), residency
    assert len(set().union(*residency.values())) == 2, "rendezvous hashing left a replica without bundles"
    with futures.ThreadPoolExecutor(8) as pool:  # concurrent: spread is bounded by max_holders (2)
        codes = list(pool.map(lambda i: _chat(client, f"b{i % 6}", "hi").status_code, range(48)))
    assert codes == [200] * 48
    assert wait_until(lambda: _routed(client, labels)[0] - before_total == 18 + 48, timeout=15)
    assert all(len(replicas) <= 2 for replicas in _residency(client).values())
    total, hits = _routed(client, labels)
    assert hits - before_hits >= 18 + 48 - len(BUNDLES)  # a miss only where a bundle spreads to a 2nd replica


def test_upload_is_served_by_every_replica_and_replaces_by_name(cluster, single, tiny, tmp_path):
    _, client = cluster
    ops = {"Authorization": f"Bearer {OPS}"}

    def upload(seed: int) -> httpx.Response:
        src = _write_bundle(tiny, tmp_path, "fresh", seed)
        files = {
            "manifest": ("manifest.json", (src / "manifest.json").read_bytes()),
            "tensors": ("tensors.safetensors", (src / "tensors.safetensors").read_bytes()),
        }
        return client.post("/v1/bundles", files=files, headers=ops)

    first = upload(seed=11)
    assert first.status_code == 201, first.text
    assert first.json()["bundle"] == "fresh@v1"
    with futures.ThreadPoolExecutor(16) as pool:  # a hot new bundle: served at once, spreads to both replicas
        answers = list(pool.map(lambda i: _chat(client, "fresh", "what is this"), range(32)))
    assert [a.status_code for a in answers] == [200] * 32
    assert {a.json()["bundle"] for a in answers} == {"fresh@v1"}
    expected_v1 = _chat(single, "fresh@v1", "what is this").json()["text"]
    assert {a.json()["text"] for a in answers} == {expected_v1}
    assert _wait_reported(client, lambda r: len(r.get("fresh@v1", ())) == 2), _residency(client)

    second = upload(seed=12)
    assert second.status_code == 201 and second.json()["bundle"] == "fresh@v2"
    assert second.json()["content_hash"] != first.json()["content_hash"]
    with futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _chat(client, "fresh", "what is this"), range(32)))
    assert {a.json()["bundle"] for a in answers} == {"fresh@v2"}
    expected_v2 = _chat(single, "fresh@v2", "what is this").json()["text"]
    assert {a.json()["text"] for a in answers} == {expected_v2}

    deleted = client.delete("/v1/bundles/fresh", headers=ops)
    assert deleted.status_code == 200 and sorted(deleted.json()["deleted"]) == ["fresh@v1", "fresh@v2"]
    gone = _chat(client, "fresh", "what is this")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "bundle_not_found"


def test_replica_kill_under_load(cluster):
    proc, client = cluster
    pids = proc.replica_pids()
    assert len(pids) == 2, pids
    stop_at = time.monotonic() + 25
    killed = {"done": False}

    def worker(i: int) -> list[tuple[int, str]]:
        out = []
        with httpx.Client(transport=httpx.HTTPTransport(uds=proc.uds), base_url="http://c", timeout=60) as c:
            while time.monotonic() < stop_at:
                stream = i % 2 == 0
                r = _chat(c, f"b{i % 6}", "what is this", stream=stream, max_tokens=32, ignore_eos=True)
                out.append((r.status_code, r.text))
        return out

    with futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(worker, i) for i in range(8)]
        time.sleep(6)
        os.kill(pids[0], signal.SIGKILL)
        killed["done"] = True
        results = [item for f in running for item in f.result()]
    assert killed["done"] and len(results) > 16
    for status, text in results:
        if status == 200 and '"error"' not in text:
            continue
        # a failure must be one of ours: JSON 503 replica_lost, or an SSE error event in a 200 stream
        if status == 200:
            assert "replica_lost" in text and text.rstrip().endswith("data: [DONE]"), text[-300:]
        else:
            assert status == 503 and json.loads(text)["error"]["type"] == "replica_lost", text
    assert wait_until(lambda: len(proc.replica_pids()) == 2 and pids[0] not in proc.replica_pids(), 90)
    assert wait_until(lambda: _chat(client, "b0", "what is this").status_code == 200, 30)


def test_serve_application_behind_rays_proxy(tiny_model_dir, shared_store, single):
    """The RayService path: the same app as a Serve ingress deployment behind Ray's HTTP proxy."""
    import subprocess
    import sys

    from server.cluster.netns import NetnsUnavailable, in_loopback_netns

    script = os.path.join(os.path.dirname(__file__), "cluster_serve_app_check.py")
    argv = [sys.executable, script, str(tiny_model_dir), str(shared_store / "store"), "8123"]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    try:
        cmd = in_loopback_netns(argv)
    except NetnsUnavailable as exc:
        pytest.fail(f"cluster tests need a loopback-only network namespace: {exc}")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(result[-1].removeprefix("RESULT "))
    assert out["ready"]["status"] == "ready"
    assert out["models"] == sorted(m["id"] for m in single.get("/v1/models").json()["data"])
    for answer, bundle in zip(out["chat"], ("b0", "b1"), strict=True):
        body = {"instruction": "what is this", "max_tokens": 8, "temperature": 0, "bundle": bundle}
        assert answer["text"] == single.post("/v1/chat", json=body).json()["text"]
    assert out["missing_status"] == 404 and out["missing"]["error"]["type"] == "bundle_not_found"
    assert out["metrics_has_replicas"]
