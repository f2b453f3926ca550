"""Auth: /health, /ready, /metrics are the only public routes; every other route (enumerated from the app, so
a new one cannot be missed) needs the chat API key or the ops token, compared exactly; ops answer 403 when no
ops token is configured; an unprotected route stops the app from being built."""

from __future__ import annotations

import re

import pytest
from api_fakes import FakeEngine
from fastapi import Depends
from fastapi.testclient import TestClient

from server.api.deps import require_api_key, require_ops_token
from server.app import UnprotectedRouteError, check_routes_protected, create_app, iter_routes
from server.settings import Settings

API_KEY = "chat-key-123456"
OPS_TOKEN = "ops-token-abcdef"
PUBLIC = {"/health", "/ready", "/metrics", "/", "/playground"}  # the playground page holds no data


def make(api_key=API_KEY, ops_token=OPS_TOKEN):
    app = create_app(Settings(api_key=api_key, ops_token=ops_token), FakeEngine())
    return app, TestClient(app, raise_server_exceptions=False)


def all_endpoints(app) -> list[tuple[str, str, object]]:
    """(method, concrete path, auth dependency or None) for every route of the app."""
    out = []
    for route in iter_routes(app.routes):
        path = re.sub(r"\{(\w+)\}", lambda m: {"version": "v1"}.get(m.group(1), "colors"), route.path)
        deps = [d.dependency for d in route.dependencies]
        guard = (
            require_ops_token
            if require_ops_token in deps
            else require_api_key
            if require_api_key in deps
            else None
        )
        out += [(method, path, guard) for method in sorted(route.methods)]
    return out


def test_the_route_inventory_is_what_we_expect():
    app, _ = make()
    routes = {(m, p): g for m, p, g in all_endpoints(app)}
    assert {p for (m, p), g in routes.items() if g is None} == PUBLIC
    assert {p for (m, p), g in routes.items() if g is require_api_key} == {
        "/v1/chat",
        "/v1/chat/completions",
        "/v1/models",
    }
    assert {(m, p) for (m, p), g in routes.items() if g is require_ops_token} == {
        ("POST", "/v1/bundles"),
        ("GET", "/v1/bundles"),
        ("GET", "/v1/bundles/colors"),
        ("DELETE", "/v1/bundles/colors"),
        ("DELETE", "/v1/bundles/colors/v1"),
    }


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token-000", "Basic " + API_KEY, f"Bearer {API_KEY}x", "Bearer", f"bearer{API_KEY}"],
)
def test_every_protected_route_refuses_missing_or_wrong_credentials(header):
    app, client = make()
    headers = {} if header is None else {"Authorization": header}
    for method, path, guard in all_endpoints(app):
        resp = client.request(method, path, headers=headers)
        if guard is None:
            assert resp.status_code in (200, 503), (method, path)
            continue
        assert resp.status_code == 401, (method, path, resp.status_code)
        assert resp.headers["www-authenticate"] == "Bearer"
        error = resp.json()["error"]
        assert error["type"] == "unauthorized"
        expected = "M2PT_OPS_TOKEN" if guard is require_ops_token else "M2PT_API_KEY"
        assert expected in error["message"]


def test_keys_are_not_interchangeable_and_not_read_from_the_query():
    app, client = make()
    for method, path, guard in all_endpoints(app):
        if guard is require_ops_token:
            assert (
                client.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code
                == 401
            )
        if guard is require_api_key:
            assert (
                client.request(method, path, headers={"Authorization": f"Bearer {OPS_TOKEN}"}).status_code
                == 401
            )
    assert client.get(f"/v1/models?api_key={API_KEY}").status_code == 401
    assert client.get(f"/v1/bundles?token={OPS_TOKEN}").status_code == 401


def test_right_credentials_pass():
    _, client = make()
    chat = client.post("/v1/chat", json={"instruction": "hi"}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert chat.status_code == 200 and chat.json()["text"] == "echo hi"
    models = client.get("/v1/models", headers={"authorization": f"bearer   {API_KEY}  "})
    assert models.status_code == 200


def test_ops_routes_are_403_without_a_configured_token():
    app, client = make(ops_token=None)
    for method, path, guard in all_endpoints(app):
        if guard is require_ops_token:
            resp = client.request(method, path, headers={"Authorization": f"Bearer {OPS_TOKEN}"})
            assert resp.status_code == 403
            assert resp.json()["error"] == {
                "type": "forbidden",
                "message": "the ops API is disabled on this server: start it with M2PT_OPS_TOKEN set",
            }


def test_chat_is_open_without_an_api_key_but_ops_stay_closed():
    _, client = make(api_key=None)
    assert client.post("/v1/chat", json={"instruction": "hi"}).status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/bundles").status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "/v1/bundles/",
        "//v1/bundles",
        "/V1/BUNDLES",
        "/v1/bundles/%2e%2e",
        "/v1/./bundles",
        "/v1/bundles?x=/health",
        "/health/../v1/bundles",
    ],
)
def test_path_tricks_never_reach_ops_without_a_token(path):
    _, client = make()
    resp = client.get(path, follow_redirects=False)
    assert resp.status_code in (401, 404, 307), (path, resp.status_code)
    if resp.status_code == 307:  # a slash redirect, answered before any handler ran
        assert client.get(path, follow_redirects=True).status_code in (401, 404)


def test_an_unprotected_route_is_refused_at_startup():
    app, _ = make()

    @app.get("/v1/debug")
    async def debug() -> dict:
        return {}

    with pytest.raises(UnprotectedRouteError, match="/v1/debug"):
        check_routes_protected(app)

    @app.get("/v1/debug2", dependencies=[Depends(require_api_key)])
    async def debug2() -> dict:
        return {}

    with pytest.raises(UnprotectedRouteError, match="/v1/debug\\b"):
        check_routes_protected(app)


def test_docs_and_openapi_are_not_served():
    _, client = make()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404
