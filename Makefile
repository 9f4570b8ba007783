# The two commands of the README. Both set up .venv first (scripts/setup_env.sh, idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup test test-fast demo clean

setup:
	@VENV=$(VENV) bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

# unit tests only (skips the command-line and learning tests)
test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

demo: setup
	@VENV=$(VENV) bash scripts/demo.sh

clean:
	rm -rf work .pytest_cache
