# The README's two commands: `make demo` and `make test`. Each creates .venv when missing,
# installs torch only when it is not importable, installs the package (editable, with the
# dev extra) only when pyproject.toml changed, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_STAMP := $(VENV)/.torch-installed
INSTALL_STAMP := $(VENV)/.advdefense-installed

.PHONY: demo test lint typecheck unit slow clean install

install: $(INSTALL_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	touch $@

$(INSTALL_STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(INSTALL_STAMP)
	$(BIN)/advdefense demo

lint: $(INSTALL_STAMP)
	$(BIN)/ruff check src tests recipes $(wildcard benchmarks scripts)
	$(BIN)/ruff format --check src tests recipes $(wildcard benchmarks scripts)

typecheck: $(INSTALL_STAMP)
	$(BIN)/mypy

unit: $(INSTALL_STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

slow: $(INSTALL_STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
