"""The playground page: `GET /` and `GET /playground` serve one self-contained HTML file (inline CSS and JS,
no external assets, works offline) that talks to the public API (`/v1/models`, `/v1/chat` with SSE) from
the browser.

The page is public, as `/health` is: it holds no data, and the API calls it makes carry the API key the
user types (kept in the page's memory only). It is sent with a strict Content-Security-Policy: scripts only
the page's own inline script (by its sha256), connections only to this origin, images only from data:/blob:
URIs (the preview of the user's image), no framing. Nothing is stored: images go to `/v1/chat` in the
request body and nowhere else."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PUBLIC_PATHS = frozenset({"/", "/playground"})
router = APIRouter()


@functools.lru_cache(maxsize=1)
def page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy (read once, on first request)."""
    html = resources.files("server").joinpath("static", "playground.html").read_bytes()
    scripts = re.findall(rb"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts)
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def playground() -> HTMLResponse:
    html, csp = page()
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )
