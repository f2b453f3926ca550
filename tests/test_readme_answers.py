"""Every row of the README's demo table, asked over HTTP of a real server (uvicorn + the real engine on the
shipped demo model, the demo bundles served read-only beside an empty user store) gets the answer the
README prints. `scripts/check_clean_install.sh` runs this file in a brand-new venv installed from
constraints.txt, which is what "a clean clone with the lock gives the README's answers" means."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
from api_fakes import LiveServer, wait_until

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(
    r"^\| `(?P<image>[\w.]+)`[^|]*\| (?P<question>[^|]+?) \| (?P<bundle>none|`\w+`) \| (?P<answer>\S+)"
)


def readme_rows() -> list[tuple[str, str, str | None, str]]:
    text = (REPO / "README.md").read_text().split("What the shipped demo answers", 1)[1]
    rows = [m.groupdict() for m in map(ROW.match, text.split("\n\n", 2)[1].splitlines()) if m]
    return [
        (r["image"], r["question"], None if r["bundle"] == "none" else r["bundle"].strip("`"), r["answer"])
        for r in rows
    ]


def test_the_table_is_parsed_whole():
    rows = readme_rows()
    assert len(rows) >= 7 and {b for *_, b, _ in rows} >= {None, "digits", "size"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server.app import create_app
    from server.settings import Settings

    settings = Settings(api_key=None, ops_token=None, store=tmp_path_factory.mktemp("user") / "bundles")
    with LiveServer(create_app(settings)) as live:
        assert wait_until(lambda: httpx.get(live.url + "/ready").status_code == 200, timeout=120)
        yield live.url


@pytest.mark.parametrize("image,question,bundle,answer", readme_rows())
def test_readme_answer(server, image, question, bundle, answer):
    body = {
        "instruction": question,
        "image": base64.b64encode((REPO / "demo" / "examples" / image).read_bytes()).decode(),
    }
    if bundle:
        body["bundle"] = bundle
    reply = httpx.post(server + "/v1/chat", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"].strip() == answer
