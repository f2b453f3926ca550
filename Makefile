# The two commands of the README. Both set everything up first (idempotent), then run.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup serve test test-all bench serve-cluster test-cluster bench-cluster
setup:
	bash scripts/setup.sh

serve: setup
	$(VENV)/bin/m2pt serve

test: setup
	$(VENV)/bin/python -m pytest -q

# Slow checks too (marked `slow`): the whole demo-model evaluation, longer training runs.
test-all: setup
	$(VENV)/bin/python -m pytest -q -m "not gpu"

bench: setup
	$(VENV)/bin/python -m bench.serve_bench --out bench/results

# Scale-out (docs/cluster.md): the demo on 2 Ray Serve replicas in a loopback-only network namespace (root),
# on http://127.0.0.1:8000. Installs the optional extra first.
serve-cluster: setup
	$(VENV)/bin/pip install -q -e '.[cluster]'
	bash scripts/serve_cluster.sh

# The cluster tests (marked `cluster`, about 100 s on 2 cores; root for unshare -n).
test-cluster: setup
	$(VENV)/bin/pip install -q -e '.[cluster]'
	$(VENV)/bin/python -m pytest -q -m cluster tests/test_cluster.py

bench-cluster: setup
	$(VENV)/bin/pip install -q -e '.[cluster]'
	$(VENV)/bin/python -m bench.cluster_bench --out bench/results
