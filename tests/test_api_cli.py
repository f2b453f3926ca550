"""`m2pt serve` and `Settings`: flag → setting mapping, defaults (the shipped demo on 127.0.0.1:8000),
one-line errors with exit status 2 for bad settings, secrets from the environment only, and one real run of
the console command on the tiny model (real engine, real uvicorn) that answers, enforces the API key and stops
cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from api_fakes import _free_port, png_b64
from pydantic import ValidationError

from prompts_store.layered import user_store_dir
from server.cli import _FLAGS, add_serve_command, env_var, run_serve, settings_from_args
from server.settings import DEMO_MODEL_DIR, DEMO_STORE_DIR, Settings, SettingsError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="m2pt")
    parser.add_argument("--log-level", default="INFO")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_no_arguments_serve_the_shipped_demo_on_localhost_8000(monkeypatch):
    monkeypatch.delenv("M2PT_API_KEY", raising=False)
    monkeypatch.delenv("M2PT_OPS_TOKEN", raising=False)
    args = parse()
    assert args.func is run_serve
    settings = settings_from_args(args)
    assert settings == Settings()
    assert settings.model == str(DEMO_MODEL_DIR) and settings.store == user_store_dir()
    assert settings.read_only_stores == [DEMO_STORE_DIR]  # the demo bundles, read-only, beside the user store
    assert (settings.host, settings.port, settings.device, settings.dtype) == (
        "127.0.0.1",
        8000,
        "auto",
        "auto",
    )
    assert settings.max_bundles_per_batch is None and not settings.allow_remote_images
    assert settings.api_key is None and settings.ops_token is None


def test_flags_map_to_settings(tmp_path):
    args = parse(
        "--model",
        "llava-hf/llava-1.5-7b-hf",
        "--store",
        str(tmp_path),
        "--host",
        "0.0.0.0",
        "--port",
        "9001",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-batch-size",
        "4",
        "--max-queue",
        "10",
        "--max-bundles-per-batch",
        "1",
        "--max-resident-bundles",
        "3",
        "--image-cache-size",
        "0",
        "--request-timeout",
        "7.5",
        "--max-tokens-limit",
        "99",
        "--default-max-tokens",
        "9",
        "--allow-remote-images",
        "--remote-image-domain",
        "Images.Example.com.",
        "--max-bundle-bytes",
        "4096",
        "--no-access-log",
    )
    s = settings_from_args(args)
    assert (s.model, s.store, s.host, s.port, s.device, s.dtype) == (
        "llava-hf/llava-1.5-7b-hf",
        tmp_path,
        "0.0.0.0",
        9001,
        "cpu",
        "float32",
    )
    assert (s.max_batch_size, s.max_queue, s.max_bundles_per_batch, s.max_resident_bundles) == (4, 10, 1, 3)
    assert (s.image_cache_size, s.request_timeout_s, s.max_tokens_limit, s.default_max_tokens) == (
        0,
        7.5,
        99,
        9,
    )
    assert s.allow_remote_images and s.remote_image_domains == ("images.example.com",)
    assert s.max_bundle_bytes == 4096 and args.access_log is False
    assert Settings(max_tokens_limit=16).effective_default_max_tokens == 16
    assert Settings().effective_default_max_tokens == 64
    s.check_paths()  # a hub id is accepted without touching the network


def test_every_setting_has_a_flag_documented_by_its_field_and_an_env_var():
    """The CLI is the settings: every field but the secrets has a flag whose help is the field's description and
    names its environment variable (every limit an error message points at can be raised without code)."""
    parser = argparse.ArgumentParser(prog="m2pt")
    serve = add_serve_command(parser.add_subparsers(dest="command"))
    helps = {a.dest: a.help for a in serve._actions}
    flagged = {field for _, field, _ in _FLAGS}
    assert set(Settings.model_fields) - {"api_key", "ops_token"} == flagged
    for flag, field, _ in _FLAGS:
        assert Settings.model_fields[field].description in helps[field]
        assert f"env {env_var(flag)})" in helps[field]
    assert {"max_text_tokens", "max_visual_tokens", "max_bundle_bytes", "max_messages"} <= flagged


def test_environment_variables_set_limits_and_a_given_flag_wins():
    env = {
        "M2PT_MAX_TEXT_TOKENS": "32",
        "M2PT_MAX_VISUAL_TOKENS": "16",
        "M2PT_ALLOW_REMOTE_IMAGES": "true",
        "M2PT_REMOTE_IMAGE_DOMAIN": "Images.Example.com, cdn.example.org",
        "M2PT_REQUEST_TIMEOUT": "9.5",
    }
    s = settings_from_args(parse("--max-visual-tokens", "8"), env)
    assert (s.max_text_tokens, s.max_visual_tokens, s.request_timeout_s) == (32, 8, 9.5)
    assert s.allow_remote_images and s.remote_image_domains == ("images.example.com", "cdn.example.org")
    limits = s.bundle_limits()
    assert (limits.max_text_tokens, limits.max_visual_tokens) == (32, 8)
    assert limits.max_bytes == s.max_bundle_bytes + s.max_manifest_bytes
    assert settings_from_args(parse(), {"M2PT_ALLOW_REMOTE_IMAGES": "off"}) == Settings()


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--port", "70000"], {}, "m2pt serve: --port: Input should be less than or equal to 65535"),
        (
            ["--max-batch-size", "0"],
            {},
            "m2pt serve: --max-batch-size: Input should be greater than or equal to 1",
        ),
        (["--request-timeout", "-1"], {}, "m2pt serve: --request-timeout: Input should be greater than 0"),
        (["--default-max-tokens", "600"], {}, "default_max_tokens (600) exceeds max_tokens_limit (512)"),
        (
            [],
            {"M2PT_API_KEY": "1234567"},
            "m2pt serve: M2PT_API_KEY: tokens must be at least 8 characters long",
        ),
        (["--allow-remote-images"], {}, "allow_remote_images needs remote_image_domains"),
        (["--model", "/no/such/model/dir"], {}, "--model '/no/such/model/dir': no such directory"),
        (
            [],
            {"M2PT_OPS_TOKEN": "short"},
            "m2pt serve: M2PT_OPS_TOKEN: tokens must be at least 8 characters long",
        ),
        (
            [],
            {"M2PT_MAX_TEXT_TOKENS": "0"},
            "m2pt serve: M2PT_MAX_TEXT_TOKENS: Input should be greater than or equal to 1",
        ),
        (
            ["--max-visual-tokens", "0"],
            {"M2PT_MAX_VISUAL_TOKENS": "12"},
            "m2pt serve: --max-visual-tokens: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_settings_exit_2_with_a_message(argv, env, message, monkeypatch, capsys, tmp_path):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = argv if "--model" in argv else ["--model", str(tmp_path), *argv]
    assert run_serve(parse(*argv)) == 2
    assert message in capsys.readouterr().err


def test_settings_are_strict_and_hide_secrets(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(max_batchsize=3)
    with pytest.raises(ValidationError):
        Settings(device="tpu")
    monkeypatch.setenv("M2PT_API_KEY", "super-secret-key")
    settings = Settings()
    assert settings.api_key.get_secret_value() == "super-secret-key"
    assert "super-secret-key" not in repr(settings) and "super-secret-key" not in str(settings.model_dump())
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"x")
    with pytest.raises(SettingsError, match="is a file; pass the checkpoint directory"):
        Settings(model=str(model_file)).check_paths()
    with pytest.raises(SettingsError, match="exists and is not a directory"):
        Settings(model=str(tmp_path), store=model_file).check_paths()
    assert Settings(max_bundle_bytes=4096, max_manifest_bytes=1024).max_upload_bytes == 4096 + 1024 + 65536


def test_m2pt_serve_runs_the_real_server_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "M2PT_API_KEY": "cli-test-key-1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "m2pt_cli",
        "--log-level",
        "INFO",
        "serve",
        "--no-access-log",
        "--model",
        str(tiny_model_dir),
        "--store",
        str(tmp_path / "store"),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-tokens-limit",
        "16",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.25)
        payload = {"instruction": "what is this digit ?", "image": png_b64(), "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat", json=payload, timeout=60).status_code == 401
        resp = httpx.post(
            f"{url}/v1/chat", json=payload, timeout=60, headers={"Authorization": "Bearer cli-test-key-1"}
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["bundle"] is None and body["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 4 and body["usage"]["prompt_tokens"] > 0
        too_many = httpx.post(
            f"{url}/v1/chat",
            json={**payload, "max_tokens": 17},
            timeout=60,
            headers={"Authorization": "Bearer cli-test-key-1"},
        )
        assert too_many.status_code == 400 and "limit of 16" in too_many.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    output = proc.stdout.read()
    # the graceful shutdown drains, runs the lifespan shutdown (engine.stop) and exits 0 (server.api.shutdown)
    assert code == 0, output
    assert "Application shutdown complete" in output and "Traceback" not in output, output
