"""The bundle entries of `GET /v1/models`: OpenAI model objects, plus an `m2pt` object per entry with what the
playground shows about a bundle version.

`bundle_models(store, base_id)` lists every bundle by name (its latest version) and by `name@version`. Each
entry has the OpenAI fields (`id`, `object`, `created` = publish time, `owned_by`, `parent`) and `m2pt`:
`name`, `version`, `latest`, `read_only` (a shipped bundle in a read-only store), `created_at`, `base_model`
(id only), `text_prompts`, `visual_prompts`, `has_projector`, `size_bytes`, `trainer`, `dataset`, `steps` and
`metrics` (`eval_exact_match`, `final_loss`, `eval_curve` as [[step, accuracy], ...]) when the bundle's
provenance has them. Training configuration (which names local paths) is left out: no server paths in
answers."""

from __future__ import annotations

from typing import Any

from prompts_store.errors import BundleNotFoundError

_METRICS = ("eval_exact_match", "final_loss", "eval_curve")


def version_card(info: Any, read_only: bool) -> dict[str, Any]:
    """The `m2pt` object of one `VersionInfo`."""
    prov = info.provenance if isinstance(info.provenance, dict) else {}
    dataset = prov.get("dataset")
    metrics = info.metrics
    return {
        "name": info.name,
        "version": info.version,
        "latest": info.latest,
        "read_only": read_only,
        "created_at": info.created_at,
        "base_model": _public_model_id(info.base_model.get("model_id")),
        "text_prompts": info.text_prompts,
        "visual_prompts": info.visual_prompts,
        "has_projector": info.has_projector,
        "size_bytes": info.size_bytes,
        "trainer": prov.get("trainer") if isinstance(prov.get("trainer"), str) else None,
        "dataset": {k: v for k, v in dataset.items() if k != "path"}
        if isinstance(dataset, dict)
        else dataset,
        "steps": prov.get("steps"),
        "metrics": {k: metrics[k] for k in _METRICS if k in metrics},
    }


def _read_only(store: Any, name: str, version: str) -> bool:
    check = getattr(store, "is_read_only", None)
    return bool(check(store.resolve(f"{name}@{version}"))) if check is not None else False


def bundle_models(store: Any, base_id: str) -> list[dict[str, Any]]:
    """Model objects for every bundle in `store` (blocking: call in a worker thread)."""
    out = []
    for info in store.list():
        try:
            versions = {v.version: v for v in store.inspect(info.name)}
        except BundleNotFoundError:  # deleted while listing
            continue
        for model_id, version in [(info.name, info.latest.version)] + [
            (f"{info.name}@{v}", v) for v in info.versions
        ]:
            try:
                created = int(store.resolve(model_id).path.stat().st_mtime)
                card = version_card(versions[version], _read_only(store, info.name, version))
            except (BundleNotFoundError, OSError, KeyError):  # deleted while listing
                continue
            out.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "m2pt",
                    "parent": base_id,
                    "m2pt": card,
                }
            )
    return out


def _public_model_id(model_id: object) -> str | None:
    """The base model id a bundle was trained on, as clients may see it: a hub id as is, a local path by its
    last component only (no path of the server in any answer)."""
    if not isinstance(model_id, str) or not model_id:
        return None
    return model_id.rstrip("/").rsplit("/", 1)[-1] if model_id.startswith(("/", ".", "~")) else model_id
