# The two commands a newcomer needs: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROWS   ?= 50000

.PHONY: install demo demo-live test test-fast typecheck notebooks browser pgbouncer lint bench clean constraints check-lock

# Exact versions, each file checked against its sha256: an audited procedure installs the same
# bytes every time. constraints.lock is the lock (`make constraints` writes it from
# constraints.in): every third-party distribution, the build backend and pip included, with
# --hash lines. pip enforces hashes for all of a `-r` file under --require-hashes, but an
# editable install has no hash to check (pip refuses the two together), so: the lock alone,
# --no-deps (nothing unlisted comes in); then the repository's own two distributions, editable,
# --no-deps, built by the lock's setuptools (--no-build-isolation: no unhashed download to
# build them); then pip check, which fails if the lock misses anything they need.
$(STAMP): pyproject.toml scripts/sessionstore/pyproject.toml constraints.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r constraints.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation \
	  -e scripts/sessionstore -e '.[dev,embedded,browser,example]'
	$(BIN)/python -m pip check
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

## Re-lock constraints.lock (versions and sha256 of every file) from constraints.in: after changing
## a pyproject.toml's ranges or extras. Pins already in the lock are kept where they still fit
## (uv prefers them); `make constraints UPGRADE=1` moves every pin to the newest that fits.
## For every Python >= 3.11 and platform (--universal): pip picks by each line's marker.
## constraints.txt is the same pins without the hashes, for `pip install -c` (an app installing
## the store alone, an editable install): pip 23 turns hashes in a -c file into --require-hashes
## for the whole install, which an editable or an unpinned requirement then fails.
constraints: $(STAMP)
	$(BIN)/uv pip compile constraints.in --quiet --universal --python-version 3.11 \
	  --generate-hashes --no-emit-package sessionmig --no-emit-package sessionstore \
	  $(if $(UPGRADE),--upgrade) --custom-compile-command "make constraints" -o constraints.lock
	{ echo "# The versions constraints.lock pins, without its hashes: for pip install -c."; \
	  echo "# Written by make constraints from constraints.lock; never edited by hand."; \
	  grep -E '^[A-Za-z0-9]' constraints.lock | sed 's/ *\\$$//'; } > constraints.txt

## The lock is what make install installs: a file whose sha256 differs from the lock's (a
## tampered or substituted download) must stop the install. Checked offline, on a wheel built
## here, and in the real lock: every pin carries at least one sha256 (tests/test_lock.py too).
check-lock: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_lock.py

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
