# The two commands a newcomer needs: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROWS   ?= 50000

.PHONY: install demo test browser lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The whole runbook on a generated sample backup, against the embedded PostgreSQL 18 server.
demo: $(STAMP)
	$(BIN)/sessionmig sample --rows $(ROWS) --out .sessionmig/sample/sessions.db
	$(BIN)/sessionmig run --env local --fresh

## Lint, then every test (embedded server; plus SESSIONMIG_TEST_DSN's server when set).
test: $(STAMP) browser
	$(BIN)/ruff check scripts tests notebooks tools benchmarks
	$(BIN)/ruff format --check scripts tests tools benchmarks
	$(BIN)/python -m pytest

## Debian's chromium for the offline-report browser test (installed when missing and root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed: the browser test will be skipped"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check --fix scripts tests notebooks tools benchmarks
	$(BIN)/ruff format scripts tests tools benchmarks

clean:
	rm -rf reports .sessionmig .pytest_cache .hypothesis

## migrate + reconcile 1M rows (and pgloader when installed): prints the table for the README.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --rows 1000000 --unreviewed
