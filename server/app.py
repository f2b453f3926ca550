"""The FastAPI application factory.

`create_app(settings, engine=None, store=None, spec=None)`:
- with `engine=None` the real `server.engine.engine.Engine` is built in the app's lifespan (never at import
  time) by `server.engine_settings.engine_from_settings(settings, metrics)` in a worker thread, started, and
  stopped on shutdown;
- with an injected engine (any `EngineClient`; API tests), that engine is used as is: not started or stopped
  here; `store` and `spec` (the bundle store and the served model's spec) are then the ops routes' own.

`app.state` holds `settings`, `metrics` (`server.metrics.ServerMetrics`, shared with the engine), `engine`,
`store`, `spec` (None until the lifespan built them; routes then answer 503) and `bundle_limits` (from the
settings). The routes reach the store through `server.api.deps.StoreDep`, never through the engine; the
lifespan hands the app the same `BundleStore` instance the engine serves from.

Security by construction: `/health`, `/ready`, `/metrics` and the playground page (`/`, `/playground`) are the
only public routes. Every other route must carry one of the auth dependencies of `server.api.deps`
(router-level), and `create_app` raises if one does not, so a new route cannot be added unprotected by
mistake. The interactive docs and the OpenAPI schema are not served, and no route redirects (no trailing-slash
redirects: they would point at the client-chosen `Host`). Chat requests are authenticated before their body is
read (`AuthBeforeBodyMiddleware`), bodies are capped by `BodyLimitMiddleware` before parsing, chat requests are
counted by bundle and status, and `DrainMiddleware` counts requests in flight for a graceful shutdown
(`app.state.drain`, `server.api.shutdown`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Mount

from server.api import routes_chat, routes_health, routes_openai, routes_ops, routes_playground
from server.api.deps import AUTH_DEPENDENCIES, check_api_key
from server.api.drain import DrainState
from server.api.errors import install_error_handlers
from server.api.middleware import (
    AuthBeforeBodyMiddleware,
    BodyLimitMiddleware,
    DrainMiddleware,
    RequestMetricsMiddleware,
)
from server.metrics import ServerMetrics
from server.settings import Settings

if TYPE_CHECKING:
    from m2pt.spec import ModelSpec
    from prompts_store.store import BundleStore

log = logging.getLogger(__name__)

CHAT_PATHS = frozenset({"/v1/chat", "/v1/chat/completions"})
API_KEY_PATHS = CHAT_PATHS | {"/v1/models"}
UPLOAD_PATHS = frozenset({"/v1/bundles"})
PUBLIC_PATHS = routes_health.PUBLIC_PATHS | routes_playground.PUBLIC_PATHS


class UnprotectedRouteError(RuntimeError):
    """A route that is neither public nor behind an auth dependency (a programming error found at startup)."""


def create_app(
    settings: Settings, engine=None, store: BundleStore | None = None, spec: ModelSpec | None = None
) -> FastAPI:
    """Build the app; see the module contract."""
    metrics = ServerMetrics()
    app = FastAPI(
        title="m2pt-serve",
        lifespan=_lifespan(settings, metrics, engine),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,  # a slash redirect would point at the client-chosen Host header
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.store, app.state.spec = store, spec
    app.state.bundle_limits = settings.bundle_limits()
    app.state.started_at = time.time()
    app.state.drain = DrainState()
    install_error_handlers(app)
    app.include_router(routes_health.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_playground.router)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_body_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    app.add_middleware(AuthBeforeBodyMiddleware, check=check_api_key, paths=API_KEY_PATHS)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, paths=CHAT_PATHS)
    app.add_middleware(DrainMiddleware, state=app.state.drain, public_paths=routes_health.PUBLIC_PATHS)
    check_routes_protected(app)
    return app


def iter_routes(routes) -> Iterator[BaseRoute]:
    """Every leaf route the app serves, looking through included routers and mounts."""
    for route in routes:
        nested = getattr(route, "original_router", None)  # FastAPI's included-router wrapper
        if nested is not None:
            yield from iter_routes(nested.routes)
        elif isinstance(route, Mount):
            yield from iter_routes(route.routes)
        else:
            yield route


def check_routes_protected(app: FastAPI) -> None:
    """Raise `UnprotectedRouteError` unless every route is public by name or has an auth dependency."""
    for route in iter_routes(app.routes):
        if isinstance(route, APIRoute):
            if route.path in PUBLIC_PATHS:
                continue
            if any(dep.dependency in AUTH_DEPENDENCIES for dep in route.dependencies):
                continue
            raise UnprotectedRouteError(f"route {route.path} has no auth dependency and is not public")
        raise UnprotectedRouteError(f"route {getattr(route, 'path', route)!r} cannot be checked for auth")


def _lifespan(settings: Settings, metrics: ServerMetrics, injected):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if injected is not None:
            yield
            return
        settings.check_paths()
        from m2pt.families.base import UnsupportedModelError
        from server.engine_settings import engine_from_settings

        log.info("loading model %s (device %s, dtype %s)", settings.model, settings.device, settings.dtype)
        try:  # the startup gate (m2pt.loading): config, weights, module shapes, smoke prefill; before /ready
            engine = await run_in_threadpool(engine_from_settings, settings, metrics)
        except UnsupportedModelError as exc:
            log.error("m2pt serve: refusing to serve this model: %s", exc)
            raise
        await engine.start()
        app.state.store, app.state.spec = engine.store, engine.spec  # one store instance, shared
        app.state.engine = engine
        log.info("serving %s on %s:%d", engine.base_model_id, settings.host, settings.port)
        try:
            yield
        finally:
            await engine.stop()

    return lifespan
