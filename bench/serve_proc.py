"""`m2pt serve` as a child process, for the fault and load suites (and their tests): start it on a free port,
wait for `/ready`, send it signals, collect its exit status and log.

The child is the real console command (`python -m m2pt_cli serve ...`), so signal handling, the lifespan and
uvicorn are exactly what production runs. Its output goes to a log file (never a pipe that could fill up and
block it). Nothing here knows about bundles or requests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(
    probe: Callable[[], httpx.Response],
    timeout_s: float,
    proc: subprocess.Popen | None = None,
    interval_s: float = 0.2,
) -> bool:
    """Poll `probe` (a GET of `/ready`) until it answers 200 (True), `timeout_s` passes or `proc` exits (False).
    Connection errors count as not ready yet."""
    deadline = time.monotonic() + timeout_s
    while proc is None or proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if probe().status_code == 200:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return False


class ServeProcess:
    """One `m2pt serve` child. `extra` are more CLI flags; `env` adds environment variables."""

    def __init__(
        self,
        model: str | Path,
        store: str | Path,
        log_path: str | Path,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.cmd = [
            sys.executable, "-m", "m2pt_cli", "--log-level", "INFO", "serve", "--no-access-log",
            "--model", str(model), "--store", str(store), "--port", str(self.port), "--device", "cpu",
            *(extra or []),
        ]  # fmt: skip
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 180.0) -> ServeProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in wait())
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready(lambda: httpx.get(self.url + "/ready", timeout=2), ready_timeout_s, self.proc, 0.1):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"m2pt serve exited with {self.proc.returncode}:\n{self.output()}")
        self.kill()
        raise RuntimeError(f"m2pt serve not ready after {ready_timeout_s} s:\n{self.output()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.wait(30)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            if not self._log.closed:
                self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_bytes(self) -> int:
        """Resident set size of the child (Linux /proc)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
