# The two commands a newcomer needs: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROWS   ?= 50000

.PHONY: install demo demo-live test test-fast typecheck notebooks browser pgbouncer lint bench clean constraints

# Exact versions from constraints.txt: an audited procedure installs the same thing every time.
# Two distributions, both editable: the session store (scripts/sessionstore) and the runbook.
$(STAMP): pyproject.toml scripts/sessionstore/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e scripts/sessionstore -e '.[dev,embedded,browser,example]'
	touch $(STAMP)

install: $(STAMP)

## The whole runbook on a generated sample backup, against the embedded PostgreSQL 18 server.
demo: $(STAMP)
	$(BIN)/sessionmig sample --rows $(ROWS) --out .sessionmig/sample/sessions.db --replace
	$(BIN)/sessionmig run --env local --fresh

## The live cutover end to end: blue (SQLite) and green (PostgreSQL) instances of the example app
## serving real HTTP/WebSocket traffic while snapshot, migrate, reconcile and catch-up passes run.
demo-live: $(STAMP)
	$(BIN)/python examples/demo_live.py

## Lint, type-check, then every test (embedded server; plus SESSIONMIG_TEST_DSN's server when set).
test: $(STAMP) browser pgbouncer
	$(BIN)/ruff check scripts tests notebooks tools benchmarks examples
	$(BIN)/ruff format --check scripts tests tools benchmarks examples
	$(BIN)/mypy
	$(BIN)/python -m pytest

## The edit loop: lint and the tests that run no notebook (well under a minute or two).
test-fast: $(STAMP)
	$(BIN)/ruff check scripts tests notebooks tools benchmarks examples
	$(BIN)/python -m pytest -m "not slow" -q

typecheck: $(STAMP)
	$(BIN)/mypy

## Regenerate the notebooks from tools/make_notebooks.py (a test checks nothing changes).
notebooks: $(STAMP)
	$(BIN)/python tools/make_notebooks.py

## Re-pin constraints.txt from what is installed now (after changing pyproject.toml's ranges).
constraints: $(STAMP)
	{ echo "# Exact versions an audited run installs (make install: pip install -c constraints.txt …)."; \
	  echo "# Regenerate after changing pyproject.toml's ranges: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^session\(mig\|store\)'; } > constraints.txt

## Debian's chromium for the offline-report browser test (installed when missing and root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed: the browser test will be skipped"; fi; }

## Debian's PgBouncer for the tests of the session store behind a transaction pooler (installed
## when missing and root; the tests start their own, and skip saying so when it is absent).
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; \
	  else echo "pgbouncer is not installed: the tests behind PgBouncer will be skipped"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check --fix scripts tests notebooks tools benchmarks examples
	$(BIN)/ruff format scripts tests tools benchmarks examples

clean:
	rm -rf reports .sessionmig .pytest_cache .hypothesis

## The operator's clock on 1M sessions: the run, the verbs, the engines, pgloader and a COPY ceiling, side by side (the README's table).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --rows 1000000
