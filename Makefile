# `make test` and `make lab` work on a fresh clone: they create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# JupyterLab refuses to run as root without --allow-root (containers and cloud GPU boxes run as root).
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install test test-all lab figures clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# Two worker processes, one per core, each test file on one worker (a notebook's cells stay together).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --runslow $(PYTEST_ARGS)

lab: install
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

figures: install
	MPLBACKEND=Agg $(PY) -m dydit_lab figures --out figures

clean-venv:
	rm -rf $(VENV)
