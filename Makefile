# Two commands matter: `make demo` and `make test`. Both set up what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# checkov pins many libraries of its own: it lives in a separate environment so it cannot
# move the project's pins.
INFRA_VENV := .venv-infra
STAMP := $(VENV)/.installed
INFRA_STAMP := $(INFRA_VENV)/.installed

# Ray 2.60 enables token authentication on `ray start --head`; clients must opt in too.
export RAY_AUTH_MODE := token
# On machines without a GPU DeepSpeed must be told to use its CPU accelerator (gloo backend).
export DS_ACCELERATOR ?= cpu
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT := false
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1

.PHONY: setup demo test lint bench gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(INFRA_STAMP): infra/requirements-check.txt
	test -x $(INFRA_VENV)/bin/python || $(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/python -m pip install -q --upgrade pip
	$(INFRA_VENV)/bin/python -m pip install -q -r infra/requirements-check.txt
	touch $(INFRA_STAMP)

setup: $(STAMP) $(INFRA_STAMP)

demo: $(STAMP)
	@# `ray job submit` jobs run from a temporary copy of the code and keep runs/ in ~/.vitpipe: link it here.
	$(PY) -c 'from pipeline.config.paths import link_home_runs; print(link_home_runs())'
	$(PY) jobs/demo.py

# Two test processes, one test file each at a time: most tests wait on Ray, subprocesses and storage rather than
# compute, so two files run side by side even on a 2-core machine. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) $(INFRA_STAMP)
	$(VENV)/bin/ruff check .
	CHECKOV=$(abspath $(INFRA_VENV))/bin/checkov $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/loader.py

# What bench/gpu_check.py installs and reads on a GPU machine (Python 3.12, x86-64), in .gpu/ (git-ignored; carry it):
# wheels of bench/gpu-requirements.txt without their dependencies, DeepSpeed built from its sdist, JPEG shards.
GPU_DIR := .gpu
gpu-wheels: $(STAMP)
	rm -rf $(GPU_DIR) && mkdir -p $(GPU_DIR)/wheels
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_DIR)/wheels deepspeed==0.19.8
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d $(GPU_DIR)/wheels -r bench/gpu-requirements.txt
	$(PY) bench/gpu_check.py --prepare-data
	du -sh $(GPU_DIR)/wheels $(GPU_DIR)/data

clean:
	rm -rf runs .pytest_cache
