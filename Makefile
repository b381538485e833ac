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

.PHONY: setup demo test lint bench clean

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
	$(PY) jobs/demo.py

test: $(STAMP) $(INFRA_STAMP)
	$(VENV)/bin/ruff check .
	CHECKOV=$(abspath $(INFRA_VENV))/bin/checkov $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/loader.py

clean:
	rm -rf runs .pytest_cache
