# Two commands on a fresh machine: `make demo` and `make test` (which installs the dev and ray extras).
# TORCH pins the wheels that lie on this project's machines; elsewhere any recent torch works:
#   make demo TORCH="torch torchvision"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# One pytest worker per core (pytest-xdist), at most 4: the tests run torch at one thread each (tests/conftest.py),
# so a 2-core machine runs two at once. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= auto

.PHONY: demo test lint install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/antidoor demo

test: install-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
