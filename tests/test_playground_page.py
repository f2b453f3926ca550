"""The playground page as served (no browser: see test_playground_browser.py) and the bundle cards of
/v1/models that it shows: public, self-contained (no external asset of any kind), a CSP that allows exactly
its own inline script; cards with version, read-only flag, provenance and metrics, and no server paths."""

from __future__ import annotations

import base64
import hashlib
import re

from api_fakes import FakeEngine
from fastapi.testclient import TestClient
from pydantic import SecretStr

from prompts_store.layered import DEMO_STORE_DIR, LayeredBundleStore, ReadOnlyBundleStore
from prompts_store.store import BundleStore
from server.app import create_app
from server.settings import Settings

KEY = "playground-api-key"


def client(tmp_path, store=None) -> TestClient:
    settings = Settings(api_key=SecretStr(KEY), ops_token=None, store=tmp_path / "user")
    app = create_app(settings, FakeEngine(store=store), store=store)
    return TestClient(app, raise_server_exceptions=False)


def test_page_is_public_self_contained_and_locked_down(tmp_path):
    with client(tmp_path) as c:
        for path in ("/", "/playground"):
            resp = c.get(path)  # no key needed for the page itself
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        html = resp.text
        csp = resp.headers["content-security-policy"]
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I)  # no external host at all
    assert not re.search(r"<(link|iframe|object|embed)|<script [^>]*src=", html, re.I)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert "url(" not in style and "@import" not in style
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "localStorage" not in script and "sessionStorage" not in script and "document.cookie" not in script


def test_models_carry_bundle_cards_for_the_playground(tmp_path):
    store = LayeredBundleStore(BundleStore(tmp_path / "user"), [ReadOnlyBundleStore(DEMO_STORE_DIR)])
    with client(tmp_path, store) as c:
        assert c.get("/v1/models").status_code == 401
        data = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert {"digits", "digits@v1", "size", "size@v1"} <= set(by_id)
    card = by_id["digits"]["m2pt"]
    assert (card["name"], card["version"], card["latest"], card["read_only"]) == ("digits", "v1", True, True)
    assert card["metrics"]["eval_exact_match"] == 0.86 and card["metrics"]["eval_curve"][-1] == [800, 0.86]
    assert card["dataset"]["train"] == "digits" and card["steps"] == 800
    assert card["text_prompts"] == 10 and card["has_projector"] is True
    assert "config" not in card and str(DEMO_STORE_DIR.parent) not in str(data)
    assert by_id["digits"]["object"] == "model" and by_id["digits"]["parent"] == "fake-base"
