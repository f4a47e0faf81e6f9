# Each target builds its own virtualenv in .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo notebook test soak bench lint format typecheck check clean

# setup.py and the .pyx files: the compiled extensions are rebuilt in place when they change.
$(STAMP): pyproject.toml setup.py cdc/postgres/protocol/_columns.pyx cdc/postgres/_copy_drain.pyx \
		transforms/_hmac.pyx
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: install, then run `cdc demo` (a throwaway PostgreSQL, a workload, DuckDB answers)
demo: $(STAMP)
	$(BIN)/cdc demo

## notebook: install, plus JupyterLab (the `notebook` extra), then open
## notebooks/retail_analysis.ipynb (it runs the demo itself unless CDC_NOTEBOOK_LAKE=PATH);
## JUPYTER_ARGS passes options, e.g. --no-browser --ip 0.0.0.0
# Jupyter refuses to start as root (containers, CI machines) without --allow-root.
notebook: $(VENV)/.notebook-installed
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(JUPYTER_ARGS) \
		notebooks/retail_analysis.ipynb

$(VENV)/.notebook-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[notebook]'
	touch $@

## test: install, then run the whole test suite (starts its own PostgreSQL and Kafka broker)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## soak: install, then run `cdc run` for 20 minutes under a steady writer and report the
## slope of its memory (RSS); not part of CI. Shorter: `make soak CDC_SOAK_SECONDS=90`.
CDC_SOAK_SECONDS ?= 1200
soak: $(STAMP)
	CDC_SOAK_SECONDS=$(CDC_SOAK_SECONDS) $(BIN)/python -m pytest -m soak -s -p no:cacheprovider \
		tests/integration/test_soak.py $(PYTEST_ARGS)

## bench: install, then run every benchmark against its physical limit (~10 min);
## writes benchmarks/results/latest.json and latest.png
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## lint: ruff lint and format check, and the import layers (import-linter)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

## format: apply ruff's formatting and safe fixes
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## typecheck: mypy on the packages
typecheck: $(STAMP)
	$(BIN)/mypy

## check: everything CI runs
check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
