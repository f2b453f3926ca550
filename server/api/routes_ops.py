"""Ops API over the server's bundle store: upload, list, inspect, delete. Every route needs the ops token.

- `POST /v1/bundles`: multipart/form-data with files `manifest` (manifest.json) and `tensors`
  (tensors.safetensors), optional fields `name` and `version`. The bundle is validated against the SERVED
  model (fingerprint, shapes, dtype, finite values, hashes, size caps) by `BundleStore.publish_files` before
  it becomes visible; a bad upload writes nothing. 201 `{"bundle": "name@version", "name", "version",
  "content_hash"}`. New chat requests use the new version at once; in-flight ones keep the version they
  pinned.
- `GET /v1/bundles`: every name with its versions and latest version; names whose index cannot be read are
  listed apart under `unreadable` (only present then; with the error) instead of failing the whole listing.
- `GET /v1/bundles/{name}` (or `name@version`): versions, sizes, shapes, creation time, provenance, training
  metrics and this server's request/token counts per version.
- `DELETE /v1/bundles/{name}`, `/v1/bundles/{name}@{version}` or `/v1/bundles/{name}/{version}`: new requests
  get 404 at once; requests that already pinned it finish.

Names are validated by the store before any path is built; store errors carry their own status
(400/404/409/413/422). Store I/O runs in worker threads. The store, the served spec and the limits come from
`server.api.deps` (`StoreDep`, `SpecDep`, `LimitsDep`); this module never touches the engine, and does not load
bundles onto the device (the engine does, on use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompts_store.names import parse_ref
from server.api.deps import LimitsDep, SettingsDep, SpecDep, StoreDep, require_ops_token
from server.api.errors import ApiError, PayloadTooLargeError

if TYPE_CHECKING:
    from prompts_store.store import BundleStore

router = APIRouter(dependencies=[Depends(require_ops_token)])

_UPLOAD_HELP = (
    "upload multipart/form-data with files 'manifest' (manifest.json) and 'tensors' (tensors.safetensors)"
)


class UploadError(ApiError):
    status = 400
    error_type = "invalid_upload"


@router.post("/v1/bundles", status_code=201)
async def upload_bundle(
    request: Request, settings: SettingsDep, store: StoreDep, spec: SpecDep, limits: LimitsDep
) -> JSONResponse:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UploadError(f"wrong content type; {_UPLOAD_HELP}")
    try:
        form = await request.form(max_files=2, max_fields=2, max_part_size=1024)
    except PayloadTooLargeError:
        raise
    except StarletteHTTPException as exc:  # malformed multipart, too many parts
        raise UploadError(f"{exc.detail}; {_UPLOAD_HELP}") from None
    try:
        manifest = await _read_part(form.get("manifest"), "manifest", settings.max_manifest_bytes)
        tensors = await _read_part(form.get("tensors"), "tensors", settings.max_bundle_bytes)
        name = _text_field(form.get("name"), "name")
        version = _text_field(form.get("version"), "version")
    finally:
        await form.close()
    ref = await run_in_threadpool(
        store.publish_files, manifest, tensors, spec, limits, name=name, version=version
    )
    body = {"bundle": ref.label, "name": ref.name, "version": ref.version, "content_hash": ref.content_hash}
    return JSONResponse(body, status_code=201)


_CAP_HELP = {
    "manifest": "re-export the bundle (manifests are small JSON files)",
    "tensors": "use fewer prompt tokens or no projector, or raise the server's --max-bundle-bytes",
}


async def _read_part(part: Any, field: str, cap: int) -> bytes:
    if not isinstance(part, UploadFile):
        raise UploadError(f"file part '{field}' is missing; {_UPLOAD_HELP}")
    if part.size is not None and part.size > cap:
        raise ApiError(
            f"'{field}' is {part.size} bytes, over the limit of {cap} bytes; {_CAP_HELP[field]}",
            status=413,
            error_type="payload_too_large",
        )
    data = await part.read(cap + 1)
    if len(data) > cap:
        raise ApiError(
            f"'{field}' is over the limit of {cap} bytes; {_CAP_HELP[field]}",
            status=413,
            error_type="payload_too_large",
        )
    if not data:
        raise UploadError(f"file part '{field}' is empty; {_UPLOAD_HELP}")
    return data


def _text_field(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UploadError(f"'{field}' must be a plain form field, not a file")
    return value


@router.get("/v1/bundles")
async def list_bundles(store: StoreDep) -> dict[str, Any]:
    listing = await run_in_threadpool(store.scan)
    out: dict[str, Any] = {
        "bundles": [
            {
                "name": i.name,
                "versions": list(i.versions),
                "latest": i.latest.label,
                "content_hash": i.latest.content_hash,
            }
            for i in listing.bundles
        ]
    }
    if listing.broken:  # names whose index cannot be read: listed apart so that the others keep working
        out["unreadable"] = [
            {"name": b.name, "error": {"type": b.error_type, "message": b.message}} for b in listing.broken
        ]
    return out


@router.get("/v1/bundles/{ref}")
async def inspect_bundle(ref: str, request: Request, store: StoreDep) -> dict[str, Any]:
    versions = await run_in_threadpool(store.inspect, ref)
    usage = bundle_usage(request.app.state.metrics)
    out = []
    for info in versions:
        item = info.to_json()
        item["serving"] = usage.get(item["label"], {"requests": {}, "generated_tokens": 0})
        out.append(item)
    return {"name": versions[0].name, "versions": out}


@router.delete("/v1/bundles/{ref}")
async def delete_bundle(ref: str, store: StoreDep) -> dict[str, Any]:
    name, version = parse_ref(ref)
    return await _delete(store, name, version)


@router.delete("/v1/bundles/{name}/{version}")
async def delete_bundle_version(name: str, version: str, store: StoreDep) -> dict[str, Any]:
    return await _delete(store, name, version)


async def _delete(store: BundleStore, name: str, version: str | None) -> dict[str, Any]:
    refs = await run_in_threadpool(store.delete, name, version)
    return {"deleted": [r.label for r in refs]}


def bundle_usage(metrics) -> dict[str, dict[str, Any]]:
    """Per "name@version": finished requests by status and tokens generated, from this server's metrics."""
    usage: dict[str, dict[str, Any]] = {}

    def entry(label: str) -> dict[str, Any]:
        return usage.setdefault(label, {"requests": {}, "generated_tokens": 0})

    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "m2pt_requests_total":
                entry(sample.labels["bundle"])["requests"][sample.labels["status"]] = int(sample.value)
            elif sample.name == "m2pt_generated_tokens_total":
                entry(sample.labels["bundle"])["generated_tokens"] = int(sample.value)
    return usage
