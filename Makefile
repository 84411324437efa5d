# The README's two commands are `make demo` and `make test`; everything else is for developers.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test test-fast test-faults bench demo up down lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build that lies on the development machines' disk; see pyproject.toml.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-faults: install
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/orchestration.py
	@echo "docs/benchmarks.md rewritten"

demo: install
	$(BIN)/python -m deployments.demo

up: install
	$(BIN)/python -m deployments.local up

down: install
	$(BIN)/python -m deployments.local down

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy resumable tasks flows

clean:
	rm -rf $(VENV) .resumable .pytest_cache .mypy_cache .ruff_cache
