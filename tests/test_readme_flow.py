"""The README's training flow, run as written (at tiny scale) in the repository: it must not change a tracked
file, nor the shipped demo bundles, and `m2pt bundle rm` must leave nothing behind. Plus the frictions a
new user met: `make serve ARGS=...`, `--push-url` checked before training, Ctrl-C during training."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_user_store import tree_snapshot

from m2pt_cli.main import main as m2pt

REPO = Path(__file__).resolve().parents[1]
TINY_SCALE = [
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--train-size",
    "8",
    "--eval-size",
    "4",
    "--eval-every",
    "0",
]


def readme_block(heading: str) -> list[str]:
    """The `m2pt ...` lines of the first bash block under `## heading` in the README, comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("m2pt ")]


def git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def test_readme_training_flow_touches_no_tracked_file(monkeypatch, tmp_path, capsys):
    commands = readme_block("Training")
    assert [c.split()[1] for c in commands] == ["train", "bundle", "bundle", "bundle"]
    assert [c.split()[2] for c in commands[1:]] == ["validate", "publish", "list"]  # validate after train
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("M2PT_HOME", str(tmp_path / "home"))
    run_dir = f"runs/test-readme-{uuid.uuid4().hex[:8]}"
    status, demo = git_status(), tree_snapshot(REPO / "demo")
    try:
        for command in commands:
            argv = shlex.split(command.replace("runs/my-digits", f"{run_dir}/my-digits"))[1:]
            argv += TINY_SCALE + ["--no-progress"] if argv[0] == "train" else []
            assert m2pt(argv) == 0, command
        out = capsys.readouterr().out
        assert "my-digits" in out and "digits" in out and "size" in out  # list: yours and the demo's
        assert (tmp_path / "home" / "bundles" / "my-digits" / "v1" / "manifest.json").is_file()
        assert git_status() == status  # no tracked (or unignored) file changed or appeared
        assert tree_snapshot(REPO / "demo") == demo  # the demo bundles untouched, not even .locks/.tmp
        assert m2pt(["bundle", "rm", "my-digits"]) == 0
        store = tmp_path / "home" / "bundles"
        left = sorted(
            str(p.relative_to(store)) for p in store.rglob("*") if not str(p.relative_to(store))[0] == "."
        )
        assert left == ["my-digits", "my-digits/index.json"]
    finally:
        subprocess.run(["rm", "-rf", str(REPO / run_dir)], check=True)


def test_make_serve_passes_args_to_m2pt_serve():
    out = subprocess.run(
        ["make", "-n", "serve", "ARGS=--host 0.0.0.0 --port 9001"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"\.venv/bin/m2pt serve --host 0\.0\.0\.0 --port 9001$", out.stdout, re.M), out.stdout


def test_push_url_is_checked_before_training(tmp_path, monkeypatch, capsys):
    from api_fakes import _free_port

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("M2PT_OPS_TOKEN", "ops-token-for-tests")
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    code = m2pt(
        ["train", "--base", "demo/base", "--data", "digits", "--out", str(tmp_path / "b"), "--push-url", url]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"--push-url: cannot reach {url}/v1/bundles" in err and "start the server first" in err
    assert time.monotonic() - started < 30 and not (tmp_path / "b").exists()  # no training ran


def test_push_url_with_a_wrong_token_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import httpx
    from api_fakes import FakeEngine, LiveServer, wait_until
    from pydantic import SecretStr

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(api_key=None, ops_token=SecretStr("the-real-ops-token")), FakeEngine())
    with LiveServer(app) as server:
        assert wait_until(lambda: httpx.get(server.url + "/health").status_code == 200, timeout=30)
        monkeypatch.setenv("M2PT_OPS_TOKEN", "a-wrong-ops-token")
        argv = ["train", "--base", "demo/base", "--data", "digits", "--out", str(tmp_path / "b")]
        code = m2pt([*argv, "--push-url", server.url])
    err = capsys.readouterr().err
    assert code == 2 and "refused the ops token (HTTP 401)" in err and not (tmp_path / "b").exists()


@pytest.mark.timeout(300)
def test_ctrl_c_during_training_prints_one_line_and_the_resume_hint(tmp_path):
    out = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "m2pt_cli.main", "--log-level", "WARNING", "train", "--base", "demo/base"]
    cmd += [
        "--data",
        "digits",
        "--out",
        str(out),
        "--steps",
        "100000",
        "--batch-size",
        "4",
        "--train-size",
        "16",
    ]
    cmd += ["--eval-size", "4", "--eval-every", "0", "--checkpoint-every", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    latest = Path(str(out) + ".ckpt") / "latest.json"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latest.exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert re.fullmatch(
        r"m2pt train: interrupted; the last checkpoint \(step \d+\) is in .*\.ckpt: rerun the same command "
        r"with --resume to continue from it",
        lines[-1],
    ), err
    assert not out.exists()  # no half-written bundle
