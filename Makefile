# Each target does its own set-up, so both Quick start commands work on a fresh machine.
# The demo needs only the package; tests and linters add the [test] extras on top.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench system-deps clean

$(VENV)/.installed: pyproject.toml setup.py streamd/_kernel.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

system-deps:
	bash .ci/system-deps

demo: $(VENV)/.installed
	$(VENV)/bin/streamd demo

test: $(VENV)/.installed-test system-deps
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not cluster"
	$(PY) -m pytest -q -m cluster

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check streamd tests
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
