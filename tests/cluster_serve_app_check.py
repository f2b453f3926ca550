"""Run inside a loopback-only network namespace by tests/test_cluster.py: deploy the Serve application
(`server.cluster.serve_app:app_builder`, what deploy/rayservice.yaml runs) behind Ray's HTTP proxy on
127.0.0.1, send a few requests through the proxy, print one JSON line with what came back, shut Ray down.

    python tests/cluster_serve_app_check.py MODEL_DIR STORE_DIR PORT
"""

from __future__ import annotations

import json
import sys
import time


def main(model: str, store: str, port: int) -> None:
    import httpx
    import ray
    from ray import serve

    from server.cluster.serve_app import app_builder

    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"replicas": "2", "model": model, "store": store, "device": "cpu", "max_batch_size": "8"}
        serve.run(app_builder(args), name="m2pt", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(base + "/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        body = {"instruction": "what is this", "max_tokens": 8, "temperature": 0}
        out = {
            "ready": httpx.get(base + "/ready").json(),
            "models": sorted(m["id"] for m in httpx.get(base + "/v1/models").json()["data"]),
            "chat": [
                httpx.post(base + "/v1/chat", json={**body, "bundle": b}, timeout=60).json()
                for b in ("b0", "b1")
            ],
            "missing": httpx.post(base + "/v1/chat", json={**body, "bundle": "nope"}).json(),
            "missing_status": httpx.post(base + "/v1/chat", json={**body, "bundle": "nope"}).status_code,
        }
        time.sleep(2.5)
        out["metrics_has_replicas"] = "m2pt_cluster_replicas 2.0" in httpx.get(base + "/metrics").text
        print("RESULT " + json.dumps(out), flush=True)  # noqa: T201
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
