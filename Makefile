# Every target bootstraps what it needs: a fresh clone only needs Python 3.11,
# git, make and npm.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PROTOS := $(shell find protos -name '*.proto')
GEN := shared/proto_gen

.PHONY: install run test lint proto check-proto migrate bench clean

install: $(VENV)/.installed $(BUF)

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Regenerate the Python code of the protos into $(GEN).
proto: $(VENV)/.installed
	$(PY) -m shared.codegen $(GEN)

# The committed generated code must be exactly what the protos produce.
check-proto: $(VENV)/.installed
	@rm -rf .proto-check && mkdir -p .proto-check
	$(PY) -m shared.codegen .proto-check/proto_gen
	@diff -r -x __pycache__ $(GEN) .proto-check/proto_gen \
		|| { echo "generated code is stale: run 'make proto' and commit"; rm -rf .proto-check; exit 1; }
	@rm -rf .proto-check
	@echo "generated code matches the protos"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(BUF) lint

test: install lint check-proto
	$(PY) -m pytest

run: install
	$(PY) -m devstack

migrate: $(VENV)/.installed
	$(PY) -m shared.database.migrations

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules .data .pytest_cache .ruff_cache .hypothesis
