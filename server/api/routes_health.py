"""The only public routes: `GET /health` (the process answers), `GET /ready` (the engine can serve) and `GET
/metrics` (Prometheus text format). They do no model work and read no request data.

`/ready` answers 503 with `Retry-After` (in the usual error shape) while the model loads, during a graceful
shutdown's drain, or after the engine stopped.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.errors import error_response

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    drain = getattr(request.app.state, "drain", None)
    if drain is not None and drain.draining:
        return error_response(
            503, "shutting_down", "the server is draining for shutdown; send no new requests"
        )
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        return error_response(503, "not_ready", "the model is not loaded or the engine is not running yet")
    return JSONResponse({"status": "ready", "model": engine.base_model_id})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
