# The README's two commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint test-unit test-distributed test-cluster test-fuzz

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup lint
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check alignment tests benchmarks scripts

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-distributed: setup
	$(PY) -m pytest -q tests/distributed

test-fuzz: setup
	$(PY) -m pytest -q tests/fuzz

test-cluster: setup
	$(PY) -m pytest -q tests/cluster
