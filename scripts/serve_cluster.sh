#!/usr/bin/env bash
# Serve the demo on a 2-replica Ray Serve cluster on this machine, in its own loopback-only network namespace
# (Ray's ports bind every interface; nothing of Ray is reachable from outside the namespace), bridged to
# http://127.0.0.1:${PORT:-8000} on the host. Needs root (unshare -n) and the cluster extra:
#   .venv/bin/pip install -e '.[cluster]'
# Usage: scripts/serve_cluster.sh [extra `m2pt serve` flags]     (REPLICAS=2 PORT=8000 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
REPLICAS=${REPLICAS:-2}
PORT=${PORT:-8000}
RUN_DIR=$(mktemp -d /tmp/m2pt-cluster.XXXXXX)
SOCK="$RUN_DIR/ingress.sock"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0

unshare -n bash -c "ip link set lo up && exec $PY -m m2pt_cli.main serve --replicas $REPLICAS --uds $SOCK $*" &
CLUSTER=$!
"$PY" -m server.cluster.forward --listen "127.0.0.1:$PORT" --uds "$SOCK" &
FORWARD=$!
stop() {
  kill -INT "$CLUSTER" 2>/dev/null || true   # the server shuts Serve and Ray down
  wait "$CLUSTER" 2>/dev/null || true
  kill "$FORWARD" 2>/dev/null || true
  rm -rf "$RUN_DIR"
}
trap stop EXIT INT TERM
echo "m2pt cluster: $REPLICAS replicas starting; serving on http://127.0.0.1:$PORT once /ready answers 200" >&2
wait "$CLUSTER"
