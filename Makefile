# The two commands of the README. Both set everything up first (idempotent), then run.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup serve test test-all lint bench
setup:
	bash scripts/setup.sh

serve: setup
	$(VENV)/bin/m2pt serve

test: setup
	$(VENV)/bin/python -m pytest -q

# Format check, lint and type check (CI runs this before `make test`). Config: pyproject.toml.
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Slow checks too (marked `slow`): the whole demo-model evaluation, longer training runs.
test-all: setup
	$(VENV)/bin/python -m pytest -q -m "not gpu"

bench: setup
	$(VENV)/bin/python -m bench.serve_bench --out bench/results
