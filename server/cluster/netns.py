"""Run Ray inside a loopback-only network namespace, and find its replica processes (no Ray import here).

Ray's GCS, raylet and worker gRPC ports bind every interface. On a shared host (CI, a laptop on a network)
`m2pt serve --replicas N` must therefore run in its own network namespace with only `lo` up; the ingress then
listens on a Unix socket, which crosses network namespaces (`forward` bridges it to a TCP port on the host's
loopback). `in_loopback_netns(cmd)` builds that command line; it needs root (or unprivileged user namespaces)
and `unshare`/`ip` from util-linux/iproute2. Tests and benchmarks fail loudly when that is impossible.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

REPLICA_MARK = "ServeReplica:"


class NetnsUnavailable(RuntimeError):
    """`unshare -n` cannot be used here (not root, or the tools are missing)."""


def in_loopback_netns(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped to run in a new network namespace with only the loopback interface up."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        raise NetnsUnavailable("`unshare` (util-linux) and `ip` (iproute2) are needed to isolate Ray's ports")
    if os.geteuid() != 0:
        raise NetnsUnavailable("a loopback-only network namespace needs root (unshare -n)")
    inner = f"{shlex.quote(ip)} link set lo up && exec {shlex.join(argv)}"
    return [unshare, "-n", "bash", "-c", inner]


def exposed_interfaces() -> list[str]:
    """Network interfaces of this process's network namespace other than loopback (`if_nameindex` asks the
    kernel about the current namespace; /sys/class/net would show the namespace sysfs was mounted in)."""
    import socket

    return sorted(name for _, name in socket.if_nameindex() if name != "lo")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def replica_pids(root_pid: int) -> list[int]:
    """The Ray Serve replica processes started under `root_pid` (Ray titles them `ray::ServeReplica:...`)."""
    return sorted(p for p in descendants(root_pid) if REPLICA_MARK in cmdline(p))


class ClusterProcess:
    """`m2pt serve --replicas N ... --uds SOCK` in a loopback-only network namespace, as a child process.

    `start()` launches it (its own session, output to `log_path`); `stop()` sends SIGINT (the server shuts
    Serve and Ray down), then SIGKILLs whatever is left of the process tree after `grace_s`, and returns the
    pids that had to be killed (empty when the shutdown was clean).
    """

    def __init__(self, serve_args: Sequence[str], uds: str, log_path: str, env: dict[str, str] | None = None):
        import sys

        self.uds = uds
        self.log_path = log_path
        self.argv = in_loopback_netns(
            [sys.executable, "-m", "m2pt_cli.main", "serve", *serve_args, "--uds", uds]
        )
        self.env = env
        self.proc = None

    def start(self) -> ClusterProcess:
        import subprocess

        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def replica_pids(self) -> list[int]:
        return replica_pids(self.pid)

    def stop(self, grace_s: float = 60.0) -> list[int]:
        import signal
        import subprocess
        import time

        if self.proc is None:
            return []
        tree = descendants(self.pid)
        # `unshare` and `bash -c "exec ..."` exec in place, so our child is normally the server itself.
        for pid in [self.pid, *tree]:
            if cmdline(pid).split(" ", 1)[0].endswith(("python", "python3")) and "m2pt_cli.main" in cmdline(
                pid
            ):
                os.kill(pid, signal.SIGINT)
                break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.proc.poll()  # reaps our direct child once it exits
            if not any(Path(f"/proc/{p}").exists() and _not_zombie(p) for p in [self.pid, *tree]):
                break
            time.sleep(0.2)
        left = [p for p in tree if Path(f"/proc/{p}").exists() and _not_zombie(p)]
        for p in left:
            with_suppressed_kill(p)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with_suppressed_kill(self.pid)
        return left


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def with_suppressed_kill(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
