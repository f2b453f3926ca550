"""Fault suite (issue 9), against real uvicorn servers on the tiny model and a real bundle store:

- corruption on disk: a byte flipped in a published bundle's tensors -> that version is refused at load with
  a hash-mismatch error naming it (no path), every other bundle keeps serving;
- disk full during a publish (the store's write fails with ENOSPC) -> 507 with a message, no partial
  version, the store still opens and publishes afterwards;
- client disconnects (streamed and not, at random points, 100 times) -> every slot is freed and the
  in-flight gauges are back to zero;
- crash safety (slow): SIGKILL of `m2pt serve` during uploads, restart on the same store -> every
  acknowledged version is listed and servable, nothing half-visible.
`bench/fault_suite.py` runs all of them (`-m faults`, slow ones included) and writes the figures.
"""

from __future__ import annotations

import errno
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from api_fakes import FakeEngine, LiveServer, png_b64, wait_until
from fault_helpers import record_figure, store_hashes
from prompt_helpers import strong_prompts
from pydantic import SecretStr

from m2pt.prompts import init_prompts
from prompts_store import store as store_module
from prompts_store.format import encode_bundle, save_bundle
from prompts_store.store import BundleStore

pytestmark = pytest.mark.faults

OPS = "ops-token-for-faults"
AUTH = {"Authorization": f"Bearer {OPS}"}


def _settings(model_dir, store_dir, **overrides):
    from server.settings import Settings

    return Settings(
        model=str(model_dir), store=store_dir, ops_token=SecretStr(OPS), max_tokens_limit=480, **overrides
    )


def _real_server(model_dir, store_dir, **overrides) -> LiveServer:
    from server.app import create_app

    server = LiveServer(create_app(_settings(model_dir, store_dir, **overrides))).__enter__()
    assert wait_until(lambda: httpx.get(server.url + "/ready").status_code == 200, timeout=120)
    return server


def _chat(url, bundle, max_tokens=4, **extra) -> httpx.Response:
    body = {
        "bundle": bundle,
        "instruction": "what is this digit ?",
        "image": png_b64(),
        "max_tokens": max_tokens,
    }
    return httpx.post(url + "/v1/chat", json={**body, **extra}, timeout=60)


def _publish(store: BundleStore, tiny, tmp_path: Path, name: str, seed: int) -> str:
    src = save_bundle(tmp_path / f"src-{name}", strong_prompts(tiny, 3, 2, True, seed=seed), tiny.spec, name)
    return store.publish(src, name).label


# ------------------------------------------------------------------------------------- corruption on disk
def test_a_flipped_byte_refuses_that_version_only(tiny, tiny_model_dir, tmp_path):
    store = BundleStore(tmp_path / "store")
    for i, name in enumerate(("alpha", "beta")):
        _publish(store, tiny, tmp_path, name, seed=i)
    tensors = store.root / "alpha" / "v1" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-4] ^= 0x01  # lowest mantissa bit of the last float: still finite, so only the hash can tell
    tensors.write_bytes(bytes(data))
    server = _real_server(tiny_model_dir, store.root)
    try:
        bad = _chat(server.url, "alpha")
        good, base = _chat(server.url, "beta"), _chat(server.url, None)
        again = _chat(server.url, "alpha@v1")
    finally:
        server.__exit__()
    record_figure(
        "corruption",
        corrupt_status=bad.status_code,
        corrupt_type=bad.json()["error"]["type"],
        corrupt_message=bad.json()["error"]["message"][:160],
        other_bundle_status=good.status_code,
        base_status=base.status_code,
    )
    assert bad.status_code == 422, bad.text
    error = bad.json()["error"]
    assert error["type"] == "bundle_hash"
    assert error["message"].startswith("alpha@v1: ") and "sha256" in error["message"]
    assert str(store.root) not in bad.text and "/tmp" not in bad.text
    assert again.status_code == 422  # refused on every use, never served from a half-load
    assert good.status_code == 200 and good.json()["bundle"] == "beta@v1"
    assert base.status_code == 200 and base.json()["bundle"] is None


# ---------------------------------------------------------------------------------------------- disk full
def test_disk_full_during_an_upload_is_a_clean_507(tiny, tmp_path, monkeypatch):
    from server.app import create_app
    from server.settings import Settings

    store = BundleStore(tmp_path / "store")
    store.publish_files(
        *encode_bundle(init_prompts(tiny.spec, 3, 2, seed=0), tiny.spec, "keep", None, {}), tiny.spec
    )
    before = store_hashes(store.root)
    real = store_module.write_durable

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    settings = Settings(api_key=None, ops_token=OPS, store=store.root)
    manifest, tensors = encode_bundle(init_prompts(tiny.spec, 3, 2, seed=1), tiny.spec, "keep", None, {})
    files = {"manifest": ("manifest.json", manifest), "tensors": ("tensors.safetensors", tensors)}
    with LiveServer(create_app(settings, FakeEngine(store=store), store=store, spec=tiny.spec)) as server:
        monkeypatch.setattr(store_module, "write_durable", full)
        resp = httpx.post(server.url + "/v1/bundles", files=files, headers=AUTH)
        new_name = httpx.post(server.url + "/v1/bundles", files=files, data={"name": "fresh"}, headers=AUTH)
        monkeypatch.setattr(store_module, "write_durable", real)
        listing = httpx.get(server.url + "/v1/bundles", headers=AUTH).json()
        after_fix = httpx.post(server.url + "/v1/bundles", files=files, headers=AUTH)
    record_figure(
        "disk_full",
        upload_status=resp.status_code,
        error_type=resp.json()["error"]["type"],
        message=resp.json()["error"]["message"],
        versions_after=[b["versions"] for b in listing["bundles"]],
        next_upload=after_fix.json().get("bundle"),
    )
    assert resp.status_code == 507, resp.text
    error = resp.json()["error"]
    assert error["type"] == "bundle_store_full"
    assert "could not publish keep" in error["message"] and "disk is full" in error["message"]
    assert str(store.root) not in resp.text
    assert new_name.status_code == 507 and "could not publish fresh" in new_name.json()["error"]["message"]
    assert [b["versions"] for b in listing["bundles"]] == [["v1"]] and "unreadable" not in listing
    assert after_fix.status_code == 201 and after_fix.json()["bundle"] == "keep@v2"
    reopened = BundleStore(store.root)
    assert [i.latest.label for i in reopened.list()] == ["keep@v2"]
    changed = {k for k in store_hashes(store.root) if before.get(k) != store_hashes(store.root)[k]}
    assert changed <= {"keep/index.json", "keep/v2/manifest.json", "keep/v2/tensors.safetensors"}


# ------------------------------------------------------------------------------------ client disconnects
def _gauges(url) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for name in ("m2pt_queue_depth", "m2pt_running_batch_size"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[-1])
    return out


def _disconnect_plain(url: str, delay_s: float) -> None:
    """POST a non-streamed request on a raw socket and hang up after `delay_s`, before the answer."""
    body = (
        f'{{"instruction": "what is this digit ?", "image": "{png_b64()}", "max_tokens": 400, '
        '"ignore_eos": true}'
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            "POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        time.sleep(delay_s)


def _disconnect_stream(url: str, chunks: int) -> None:
    body = {"instruction": "what is this digit ?", "image": png_b64(), "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        for i, _ in enumerate(resp.iter_lines()):
            if i >= chunks:
                break


def run_disconnects(url: str, n: int, seed: int = 0, workers: int = 8) -> None:
    """`n` requests, half streamed, each abandoned at a random point (seeded)."""
    rng = random.Random(seed)
    plan = [(rng.random() < 0.5, rng.uniform(0.0, 0.4), rng.randint(0, 30)) for _ in range(n)]

    def one(step):
        streamed, delay, chunks = step
        _disconnect_stream(url, chunks) if streamed else _disconnect_plain(url, delay)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, plan))


def seconds_until_idle(server, timeout_s: float = 10.0) -> float:
    """Seconds from now until the engine's gauges and the HTTP in-flight count are all zero."""
    start = time.monotonic()
    drain = server.app.state.drain

    def idle():
        gauges = _gauges(server.url)
        return drain.in_flight == 0 and gauges and all(v == 0 for v in gauges.values())

    assert wait_until(idle, timeout=timeout_s), (drain.in_flight, _gauges(server.url))
    return time.monotonic() - start


@pytest.fixture(scope="module")
def disconnect_server(tiny_model_dir, tmp_path_factory):
    server = _real_server(tiny_model_dir, tmp_path_factory.mktemp("disc") / "store", max_batch_size=8)
    yield server
    server.__exit__()


def test_100_random_disconnects_free_every_slot(disconnect_server):
    url = disconnect_server.url
    run_disconnects(url, 100, seed=1)
    waited = seconds_until_idle(disconnect_server)
    metrics = httpx.get(url + "/metrics").text
    aborted = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("m2pt_engine_finished_total") and 'reason="abort"' in line
    )
    record_figure("disconnects", requests=100, seconds_until_slots_free=round(waited, 3), aborted=aborted)
    assert waited < 10
    assert aborted >= 80, metrics  # the requests were cut mid-generation, not left to run out
    after = _chat(url, None, max_tokens=4)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------------- crash safety (SIGKILL)
def _uploader(url: str, tiny, name: str, acked: list, cut: list, stop: threading.Event, seed0: int) -> None:
    seed = seed0
    while not stop.is_set():
        manifest, tensors = encode_bundle(init_prompts(tiny.spec, 3, 2, seed=seed), tiny.spec, name, None, {})
        files = {"manifest": ("manifest.json", manifest), "tensors": ("tensors.safetensors", tensors)}
        try:
            resp = httpx.post(url + "/v1/bundles", files=files, headers=AUTH, timeout=30)
        except httpx.HTTPError:
            cut.append(name)  # in flight when the server died
            return
        if resp.status_code == 201:
            acked.append((resp.json()["bundle"], resp.json()["content_hash"]))
        seed += 1


@pytest.mark.slow
def test_sigkill_during_uploads_loses_no_acknowledged_version(tiny, tiny_model_dir, tmp_path):
    from bench.serve_proc import ServeProcess

    store_dir = tmp_path / "store"
    env = {"M2PT_OPS_TOKEN": OPS}
    server = ServeProcess(tiny_model_dir, store_dir, tmp_path / "serve1.log", env=env).start()
    acked: list[tuple[str, str]] = []
    cut: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_uploader, args=(server.url, tiny, f"up{i}", acked, cut, stop, 100 * i))
        for i in range(3)
    ]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(acked) >= 12, timeout=60), server.output()
    server.signal(9)  # SIGKILL, mid-upload
    stop.set()
    for t in threads:
        t.join(30)
    server.wait(30)
    with ServeProcess(tiny_model_dir, store_dir, tmp_path / "serve2.log", env=env) as again:
        listing = httpx.get(again.url + "/v1/bundles", headers=AUTH).json()
        listed = {f"{b['name']}@{v}" for b in listing["bundles"] for v in b["versions"]}
        hashes = {
            label: httpx.get(again.url + f"/v1/bundles/{label}", headers=AUTH).json()["versions"][0][
                "content_hash"
            ]
            for label in listed
        }
        served = {label: _chat(again.url, label).status_code for label in listed}
    record_figure(
        "crash_sigkill",
        acknowledged=len(acked),
        uploads_cut_by_the_kill=len(cut),
        listed_after_restart=len(listed),
        acknowledged_missing=len({label for label, _ in acked} - listed),
        listed_not_serving=sum(code != 200 for code in served.values()),
    )
    assert "unreadable" not in listing
    assert {label for label, _ in acked} <= listed
    assert all(hashes[label] == content_hash for label, content_hash in acked)
    assert set(served.values()) == {200}, served  # nothing half-visible: every listed version serves
    assert not any((store_dir / ".tmp").iterdir())
    for name_dir in (p for p in store_dir.iterdir() if not p.name.startswith(".")):
        on_disk = {p.name for p in name_dir.iterdir() if p.name != "index.json"}
        assert on_disk == {label.split("@")[1] for label in listed if label.startswith(name_dir.name + "@")}


# ------------------------------------------------------------------------ disk full, for real (a tmpfs)
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 192 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.call(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], stderr=-3) != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.call(["umount", "-l", str(mount)])


def test_a_really_full_disk_fails_a_publish_cleanly(tiny, tiny_tmpfs):
    from server.app import create_app
    from server.settings import Settings

    store = BundleStore(tiny_tmpfs / "store")
    settings = Settings(api_key=None, ops_token=OPS, store=store.root)
    acked, failure = [], None
    with LiveServer(create_app(settings, FakeEngine(store=store), store=store, spec=tiny.spec)) as server:
        for seed in range(200):
            manifest, tensors = encode_bundle(
                init_prompts(tiny.spec, 3, 2, seed=seed), tiny.spec, "fill", None, {}
            )
            files = {"manifest": ("manifest.json", manifest), "tensors": ("tensors.safetensors", tensors)}
            resp = httpx.post(server.url + "/v1/bundles", files=files, headers=AUTH)
            if resp.status_code != 201:
                failure = resp
                break
            acked.append(resp.json()["bundle"])
        listing = httpx.get(server.url + "/v1/bundles", headers=AUTH).json()
        freed = httpx.delete(server.url + f"/v1/bundles/{acked[0]}", headers=AUTH)
        retry = httpx.post(server.url + "/v1/bundles", files=files, headers=AUTH)
    assert failure is not None and len(acked) >= 1, "the tmpfs never filled up"
    record_figure(
        "disk_full_tmpfs",
        tmpfs_kib=192,
        published_before_full=len(acked),
        full_status=failure.status_code,
        full_type=failure.json()["error"]["type"],
        after_delete_status=retry.status_code,
    )
    assert failure.status_code == 507, failure.text
    assert failure.json()["error"]["type"] == "bundle_store_full"
    assert "disk is full" in failure.json()["error"]["message"] and str(store.root) not in failure.text
    assert [f"fill@{v}" for v in listing["bundles"][0]["versions"]] == acked  # nothing half-visible
    reopened = BundleStore(store.root)  # opens, sweeps the debris
    assert [r.label for r in _all_refs(reopened)] == acked[1:] + (
        [retry.json()["bundle"]] if retry.status_code == 201 else []
    )
    for ref in _all_refs(reopened):
        assert reopened.load(ref, tiny.spec).content_hash == ref.content_hash
    assert freed.status_code == 200 and retry.status_code == 201, retry.text


def _all_refs(store: BundleStore):
    return [store.resolve(f"{info.name}@{v}") for info in store.list() for v in info.versions]
