# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test demo demo-quick lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -n 2 --timeout 900 tests

demo: $(STAMP)
	$(BIN)/python -m pacx.demo --out demo_runs

demo-quick: $(STAMP)
	$(BIN)/python -m pacx.demo --out demo_runs --quick

lint: $(STAMP)
	$(BIN)/ruff check pacx scripts tests Stage*.py

clean:
	rm -rf demo_runs .pytest_cache
