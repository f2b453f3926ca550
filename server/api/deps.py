"""FastAPI dependencies: authentication of the two route groups, and access to the app's engine, settings and
bundle store.

The store, the served model's spec (uploads are validated against it) and the bundle limits are the app's own
(`app.state.store` / `.spec` / `.bundle_limits`, put there by `server.app`): the ops routes reach the store
through `StoreDep`, never through the engine.

Auth contract:
- chat routes (`require_api_key`): when `Settings.api_key` is set, `Authorization: Bearer <key>` is required
  (401 otherwise); when it is not set they are open.
- ops routes (`require_ops_token`): 403 when no ops token is configured (the ops API is then off), 401 when
  the header is missing or the token is wrong. The chat key is never accepted for ops.
- tokens are compared with `hmac.compare_digest` on bytes; they are only read from the `Authorization` header
  (never from the query string).

The chat routes' check also runs as ASGI middleware BEFORE the body is parsed (`check_api_key`, see
`server.api.middleware.AuthBeforeBodyMiddleware`), so malformed bodies of unauthenticated clients get 401.
Both are attached as router-level dependencies (see `server.app`), and `server.app` refuses to build an app in
which a non-public route lacks one of them. `AUTH_DEPENDENCIES` is that allowlist.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from pydantic import SecretStr
from starlette.requests import Request as StarletteRequest

from server.api.errors import AuthError, ForbiddenError
from server.engine.errors import EngineNotReadyError
from server.settings import Settings

if (
    TYPE_CHECKING
):  # types only: importing the store pulls in torch, which the HTTP layer does not need to import
    from m2pt.spec import ModelSpec
    from prompts_store.limits import BundleLimits
    from prompts_store.store import BundleStore

_STARTING = "the server is still starting (loading the model); retry when /ready answers 200"


def _bearer_token(request: Request | StarletteRequest) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str | None, secret: SecretStr) -> bool:
    if token is None:
        return False
    return hmac.compare_digest(token.encode("utf-8"), secret.get_secret_value().encode("utf-8"))


def get_settings(request: Request | StarletteRequest) -> Settings:
    return request.app.state.settings


def get_engine(request: Request):
    """The running engine; 503 while the lifespan has not built one yet."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineNotReadyError("the model is still loading; retry when /ready answers 200")
    return engine


def get_store(request: Request) -> BundleStore:
    """The app's bundle store; 503 until the lifespan opened it."""
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise EngineNotReadyError(_STARTING)
    return store


def get_served_spec(request: Request) -> ModelSpec:
    """The spec of the model this server runs (what uploads must fit); 503 until the model is loaded."""
    spec = getattr(request.app.state, "spec", None)
    if spec is None:
        raise EngineNotReadyError(_STARTING)
    return spec


def get_bundle_limits(request: Request) -> BundleLimits:
    """The limits every uploaded or loaded bundle must meet (from the settings)."""
    return request.app.state.bundle_limits


StoreDep = Annotated["BundleStore", Depends(get_store)]
SpecDep = Annotated["ModelSpec", Depends(get_served_spec)]
LimitsDep = Annotated["BundleLimits", Depends(get_bundle_limits)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def check_api_key(request: Request | StarletteRequest) -> None:
    """Raise `AuthError` unless the request carries the API key (when one is configured). Headers only: the
    ASGI auth middleware calls it before the body is read."""
    key = get_settings(request).api_key
    if key is None:
        return
    if not _matches(_bearer_token(request), key):
        raise AuthError("missing or wrong API key: send 'Authorization: Bearer <M2PT_API_KEY>'")


async def require_api_key(request: Request) -> None:
    """Chat routes: `Authorization: Bearer $M2PT_API_KEY` when an API key is configured."""
    check_api_key(request)


async def require_ops_token(request: Request) -> None:
    """Ops routes: `Authorization: Bearer $M2PT_OPS_TOKEN`; 403 when the server has no ops token."""
    token = get_settings(request).ops_token
    if token is None:
        raise ForbiddenError("the ops API is disabled on this server: start it with M2PT_OPS_TOKEN set")
    if not _matches(_bearer_token(request), token):
        raise AuthError("missing or wrong ops token: send 'Authorization: Bearer <M2PT_OPS_TOKEN>'")


AUTH_DEPENDENCIES = (require_api_key, require_ops_token)
