# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install what they need into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed
PEER_STAMP := $(VENV)/.peer-installed

.PHONY: demo test lint bench peer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embedded,sentry]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(DEMO_STAMP)

# The frameworks' pinned versions (their sdists are the peer suites), plus
# what their own test runners need: tblib, pytest-xdist.
$(PEER_STAMP): pyproject.toml $(TEST_STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,peer]'
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/python -m selfheal demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Django's and SQLAlchemy's own test suites, plain and through selfheal:
# fails on a test that passes plain but not through selfheal (peer/run.py).
peer: $(PEER_STAMP)
	$(BIN)/python -m peer.run $(PEER_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check selfheal tests examples bench peer
	$(BIN)/mypy

bench: $(TEST_STAMP)
	$(BIN)/python bench/bench_insert.py
	$(BIN)/python bench/bench_check.py
	$(BIN)/python bench/bench_txn.py
	$(BIN)/python bench/bench_txn.py --driver psycopg2
	$(BIN)/python bench/bench_asyncpg.py
	$(BIN)/python bench/bench_guard.py
	$(BIN)/python bench/bench_explicit.py
	$(BIN)/python bench/bench_explicit.py --against allow

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .peer build *.egg-info
