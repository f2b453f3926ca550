#!/usr/bin/env bash
# CI check that a clean install with the lock reproduces: a brand-new venv (no system site-packages) set up by the
# same scripts/setup.sh as `make`, then
#   - `pip check` (no broken or missing dependency),
#   - every installed distribution is pinned in constraints.txt at exactly that version (the lock is complete),
#   - `m2pt --help` runs, and every answer of the README's demo table comes out (tests/test_readme_answers.py).
# About a minute where pip has the wheels cached or mirrored. The temp venv is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
TMP="$(mktemp -d "${TMPDIR:-/tmp}/m2pt-clean-install.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
VENV="$TMP/venv" bash scripts/setup.sh
PY="$TMP/venv/bin/python"
"$PY" -m pip check
"$PY" - <<'PY'
import importlib.metadata as md
import re
import sys

lock = {}
for line in open("constraints.txt"):
    line = line.split("#", 1)[0].strip()
    if line:
        name, version = line.split("==")
        lock[re.sub(r"[-_.]+", "-", name).lower()] = version
bad = []
for dist in md.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name in {"m2pt-serve", "pip", "setuptools", "wheel"}:
        continue
    version = dist.version.split("+")[0]
    if lock.get(name) != version:
        bad.append(f"{name}=={dist.version} (constraints.txt: {lock.get(name, 'not pinned')})")
if bad:
    sys.exit("clean install drifted from constraints.txt:\n  " + "\n  ".join(sorted(bad)))
print("clean install: every installed distribution is pinned in constraints.txt at its version")
PY
"$TMP/venv/bin/m2pt" --help >/dev/null
# Every answer of the README's demo table, over HTTP of a real server, in this venv.
HF_HUB_OFFLINE=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_readme_answers.py
echo "clean install check passed in $((SECONDS - START)) s"
