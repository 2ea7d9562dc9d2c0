# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-slurm slurm-deps chromium-deps demo demo-quick lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The suite on 2 workers, then the Slurm tests on their own (they start one local cluster that runs 2-task jobs).
test: $(STAMP) slurm-deps chromium-deps
	WANDB_MODE=disabled $(BIN)/python -m pytest -n 2 --timeout 900 -m "not slurm" tests
	WANDB_MODE=disabled $(BIN)/python -m pytest --timeout 900 -m slurm tests/slurm

test-slurm: $(STAMP) slurm-deps
	WANDB_MODE=disabled $(BIN)/python -m pytest --timeout 900 -m slurm tests/slurm

# Debian's slurm-wlm + munge for tests/slurm (apt, as root; skipped with a message otherwise).
slurm-deps:
	@bash scripts/slurm/install_test_cluster.sh

# Debian's chromium for tests/test_report.py (apt, as root; that test fails, naming this installer, without it).
chromium-deps:
	@bash scripts/install_chromium.sh

demo: $(STAMP)
	$(BIN)/python -m pacx.demo --out demo_runs

demo-quick: $(STAMP)
	$(BIN)/python -m pacx.demo --out demo_runs --quick

# ruff, then the import layers of pyproject.toml's [tool.importlinter] (also run by tests/test_architecture.py).
lint: $(STAMP)
	$(BIN)/ruff check pacx scripts tests Stage*.py
	$(BIN)/lint-imports

clean:
	rm -rf demo_runs .pytest_cache
