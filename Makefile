# The two commands of the README. Both set up .venv first (scripts/setup_env.sh, idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# the tests run TEST_JOBS processes side by side: one intra-op thread each (the demo's commands
# take the plugin's defaults, see README)
test test-fast: export OMP_NUM_THREADS ?= 1
# test processes (pytest-xdist); each test file runs in one of them, so its fixtures are built once;
# files start in collection order, the longest first (tests/conftest.py, LONGEST_FIRST)
TEST_JOBS ?= 2

.PHONY: setup test test-fast demo gpu-check clean

setup:
	@VENV=$(VENV) bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# unit tests only (skips the command-line and learning tests)
test-fast: setup
	$(PY) -m pytest -q tests -m "not slow" -n $(TEST_JOBS) --dist loadfile

demo: setup
	@VENV=$(VENV) bash scripts/demo.sh

# on a machine with a CUDA GPU: CUDA tests, every architecture through fairseq in every precision,
# the GPU benchmark (scripts/gpu_check.sh; the demo's data-bin is built first)
gpu-check: setup
	$(PY) scripts/prepare_data.py all --lang de --work work/demo --vocab-size 6000 --max-len 64
	bash scripts/gpu_check.sh work/demo/data-bin work/gpu-check

clean:
	rm -rf work .pytest_cache
