"""The fault suite of issue 9 in one command: runs every `@pytest.mark.faults` test (slow ones included) and
writes what each measured to `bench/results/faults.json` and `bench/results/faults.md`.

    PYTHONPATH=$PWD python -m bench.fault_suite            # about 2-3 minutes on 2 CPU cores

Scenarios (tests/test_faults.py, tests/test_faults_shutdown.py): graceful shutdown with 16 streams in flight
(drain, cut at --shutdown-timeout, forced quit), SIGKILL during uploads, a byte flipped on disk, a full disk
during an upload, 100 random client disconnects. The tests assert the contract; the figures here are what
they observed (pass/fail and duration per test from pytest's JUnit XML, numbers from `record_figure`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = ["tests/test_faults.py", "tests/test_faults_shutdown.py"]


def run_pytest(workdir: Path) -> tuple[int, list[dict], list[dict]]:
    """Run the fault tests; return (pytest exit code, per-test outcomes, recorded figures)."""
    junit, figures = workdir / "junit.xml", workdir / "figures.jsonl"
    env = {**os.environ, "M2PT_FAULT_FIGURES": str(figures), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "faults", f"--junitxml={junit}", *TESTS]
    code = subprocess.call(cmd, env=env)
    outcomes = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        outcome = "failed" if failed else "skipped" if skipped else "passed"
        outcomes.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    lines = figures.read_text().splitlines() if figures.exists() else []
    return code, outcomes, [json.loads(line) for line in lines]


def to_markdown(result: dict) -> str:
    out = [
        "# Fault suite (issue 9)",
        "",
        (
            f"`{result['command']}` — {result['when']}, {result['machine']}. pytest exit code "
            f"{result['pytest_exit_code']}; {result['passed']}/{len(result['tests'])} tests passed in "
            f"{result['wall_s']:.0f} s."
        ),
        "",
        "| test | outcome | seconds |",
        "|---|---|---:|",
        *(f"| `{t['test']}` | {t['outcome']} | {t['seconds']:.1f} |" for t in result["tests"]),
        "",
        "## What each scenario measured",
        "",
    ]
    for fig in result["figures"]:
        items = ", ".join(f"{k} = `{v}`" for k, v in fig.items() if k != "test")
        out.append(f"- **{fig['test']}**: {items}")
    out += ["", "Targets: every acknowledged upload survives a SIGKILL, a corrupt version is refused with a",
            "hash error while others serve, a full disk is a clean error, slots free within 1 s of 100",
            "disconnects, SIGTERM drains with exit 0.", ""]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        code, outcomes, figures = run_pytest(Path(tmp))
    result = {
        "command": "PYTHONPATH=$PWD python -m bench.fault_suite",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "pytest_exit_code": code,
        "passed": sum(t["outcome"] == "passed" for t in outcomes),
        "wall_s": time.monotonic() - start,
        "tests": outcomes,
        "figures": figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "faults.md").write_text(to_markdown(result))
    log.info("wrote %s and %s", args.out / "faults.json", args.out / "faults.md")
    return code


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
