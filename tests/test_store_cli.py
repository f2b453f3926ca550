"""`m2pt bundle inspect|validate|list|rm|publish|push`, run in-process through `prompts_store.cli.main` and
once through the installed `m2pt` console script; `push` talks to a real uvicorn server over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from store_helpers import tiny_prompts

from prompts_store.cli import main, spec_from_checkpoint
from prompts_store.errors import BundleError
from prompts_store.format import load_bundle, save_bundle
from prompts_store.store import BundleStore

TOKEN = "s3cret-ops-token"


@pytest.fixture
def bundle_dir(tiny, tmp_path):
    return save_bundle(
        tmp_path / "colors",
        tiny_prompts(tiny),
        tiny.spec,
        "colors",
        provenance={"metrics": {"exact_match": 0.9}},
    )


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_spec_from_checkpoint_reads_config_only(tiny, tiny_model_dir):
    assert spec_from_checkpoint(str(tiny_model_dir)).fingerprint() == tiny.spec.fingerprint()


def test_publish_list_inspect_rm(capsys, tiny_model_dir, bundle_dir, tmp_path):
    store = str(tmp_path / "store")
    code, out, _ = _run(capsys, "publish", str(bundle_dir), "--store", store, "--model", str(tiny_model_dir))
    assert code == 0 and json.loads(out)["bundle"] == "colors@v1"
    assert _run(capsys, "publish", str(bundle_dir), "--store", store, "--name", "shapes")[0] == 0
    code, out, _ = _run(capsys, "list", "--store", store, "--json")
    assert code == 0 and [(b["name"], b["latest"]) for b in json.loads(out)] == [
        ("colors", "colors@v1"),
        ("shapes", "shapes@v1"),
    ]
    code, out, _ = _run(capsys, "list", "--store", store)
    assert (
        out.splitlines()[0].split() == ["NAME", "LATEST", "VERSIONS", "CONTENT", "HASH"] and "colors" in out
    )
    code, out, _ = _run(capsys, "inspect", "colors", "--store", store)
    [v1] = json.loads(out)
    assert v1["label"] == "colors@v1" and v1["metrics"] == {"exact_match": 0.9} and v1["latest"] is True
    code, out, _ = _run(capsys, "inspect", str(bundle_dir))
    assert json.loads(out)["content_hash"] == load_bundle(bundle_dir).content_hash
    assert _run(capsys, "rm", "colors@v1", "--store", store)[1].strip() == "deleted colors@v1"
    code, _, err = _run(capsys, "rm", "colors", "--store", store)
    assert code == 1 and "no bundle colors to delete" in err and "[bundle_not_found]" in err
    code, _, err = _run(capsys, "rm", "../etc", "--store", store)
    assert code == 1 and "invalid bundle name '../etc'" in err


def test_validate_ok_and_refusals(capsys, tiny_model_dir, bundle_dir, tmp_path):
    from training.tiny import TinyLlavaConfig, build_tiny_llava

    code, out, _ = _run(capsys, "validate", str(bundle_dir), "--model", str(tiny_model_dir))
    assert code == 0 and out.startswith("OK colors sha256:")
    other = build_tiny_llava(tmp_path / "other_model", TinyLlavaConfig(llm_dim=32, llm_mlp=64))
    code, _, err = _run(capsys, "validate", str(bundle_dir), "--model", str(other))
    assert code == 1 and "[bundle_fingerprint]" in err and "llm_dim 64 vs 32" in err
    code, _, err = _run(capsys, "validate", str(bundle_dir), "--max-text-tokens", "2")
    assert code == 1 and "[bundle_token_limit]" in err
    (bundle_dir / "tensors.safetensors").write_bytes(b"\x80\x04\x95 not a safetensors file at all")
    code, _, err = _run(capsys, "validate", str(bundle_dir))
    assert code == 1 and "[bundle_not_safetensors]" in err
    code, _, err = _run(capsys, "validate", str(tmp_path / "nowhere"))
    assert code == 1 and "[bundle_file_set]" in err


def test_console_script_runs_bundle_commands(bundle_dir, tmp_path):
    m2pt = Path(sys.executable).with_name("m2pt")
    store = tmp_path / "store"
    done = subprocess.run(
        [str(m2pt), "bundle", "publish", str(bundle_dir), "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["bundle"] == "colors@v1"
    assert BundleStore(store).resolve("colors").label == "colors@v1"


# ---- push against a real HTTP server -----------------------------------------------------------------------
def _upload_app(store: BundleStore, spec):
    """A minimal POST /v1/bundles with the contract of design §5 (the real route lives in server/api)."""
    app = FastAPI()

    @app.post("/v1/bundles")
    async def upload(request: Request):
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse(
                {"error": {"type": "forbidden", "message": "wrong ops token"}}, status_code=403
            )
        form = await request.form()
        manifest, tensors = await form["manifest"].read(), await form["tensors"].read()
        try:
            ref = store.publish_files(
                manifest, tensors, spec, name=form.get("name"), version=form.get("version")
            )
        except BundleError as exc:
            return JSONResponse(
                {"error": {"type": exc.error_type, "message": str(exc)}}, status_code=exc.status
            )
        return JSONResponse({"bundle": ref.label, "content_hash": ref.content_hash}, status_code=201)

    return app


@pytest.fixture
def server(tiny, tmp_path):
    import uvicorn

    store = BundleStore(tmp_path / "served_store")
    config = uvicorn.Config(_upload_app(store, tiny.spec), host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", store
    srv.should_exit = True
    thread.join(timeout=30)


def test_push_uploads_and_prints_the_answer(capsys, server, bundle_dir, monkeypatch):
    url, store = server
    code, out, err = _run(capsys, "push", str(bundle_dir), "--url", url + "/", "--token", TOKEN)
    assert code == 0, err
    assert json.loads(out)["bundle"] == "colors@v1"
    monkeypatch.setenv("M2PT_OPS_TOKEN", TOKEN)
    code, out, err = _run(
        capsys, "push", str(bundle_dir), "--url", url, "--name", "shapes", "--version", "r1"
    )
    assert code == 0 and json.loads(out)["bundle"] == "shapes@r1", err
    assert store.load("shapes@r1").content_hash == load_bundle(bundle_dir).content_hash


def test_push_failures_exit_1_with_the_server_message(capsys, server, bundle_dir, tmp_path, monkeypatch):
    url, store = server
    code, _, err = _run(capsys, "push", str(bundle_dir), "--url", url, "--token", "wrong")
    assert code == 1 and "server answered 403: wrong ops token" in err
    monkeypatch.delenv("M2PT_OPS_TOKEN", raising=False)
    code, _, err = _run(capsys, "push", str(bundle_dir), "--url", url)
    assert code == 1 and "no ops token" in err
    bad = shutil.copytree(bundle_dir, tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = 3
    (bad / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "push", str(bad), "--url", url, "--token", TOKEN)
    assert code == 1 and "server answered 422" in err and "reads format_version 1" in err
    code, _, err = _run(capsys, "push", str(bundle_dir), "--url", "http://127.0.0.1:9", "--token", TOKEN)
    assert code == 1 and "could not reach http://127.0.0.1:9/v1/bundles" in err
    assert store.list() == []
