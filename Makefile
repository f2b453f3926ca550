# The two commands of the README. Both set everything up first (idempotent), then run.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup setup-browser serve test test-all lint bench check-install serve-cluster test-cluster bench-cluster
# Flags for `m2pt serve`, e.g. `make serve ARGS="--host 0.0.0.0 --port 9000"`.
ARGS ?=
setup:
	bash scripts/setup.sh

# Debian chromium + chromium-driver for the playground's browser test (apt, when missing and root).
setup-browser:
	bash scripts/setup_browser.sh

serve: setup
	$(VENV)/bin/m2pt serve $(ARGS)

test: setup setup-browser
	$(VENV)/bin/python -m pytest -q

# Format check, lint and type check (CI runs this before `make test`). Config: pyproject.toml.
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Slow checks too (marked `slow`): the whole demo-model evaluation, longer training runs.
test-all: setup setup-browser
	$(VENV)/bin/python -m pytest -q -m "not gpu and not cluster"

# A brand-new venv installed with constraints.txt, checked against it (CI runs this; about a minute).
check-install:
	bash scripts/check_clean_install.sh

bench: setup
	$(VENV)/bin/python -m bench.serve_bench --out bench/results

# Scale-out (docs/cluster.md): the demo on 2 Ray Serve replicas in a loopback-only network namespace (root),
# on http://127.0.0.1:8000. Installs the optional extra first.
serve-cluster: setup
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[cluster]'
	bash scripts/serve_cluster.sh

# The cluster tests (marked `cluster`, about 100 s on 2 cores; root for unshare -n).
test-cluster: setup
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[cluster]'
	$(VENV)/bin/python -m pytest -q -m cluster

bench-cluster: setup
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[cluster]'
	$(VENV)/bin/python -m bench.cluster_bench --out bench/results
