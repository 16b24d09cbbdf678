# popek: two commands on a fresh Debian 12 host, as root: `make demo`, `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export POPEK_CACHE ?= $(CURDIR)/.cache/popek

.PHONY: setup demo test test-unit test-integration bench lint clean mutants openapi

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests/unit -q -rs --durations=30
	$(PY) -m pytest tests/integration tests/security -q -rs --durations=30

test-unit: setup
	$(PY) -m pytest tests/unit -q -rs --durations=30

bench: setup
	@bash scripts/setup-bench.sh
	$(PY) bench/boot.py
	$(PY) bench/containers.py
	$(PY) bench/netrules.py
	$(PY) bench/network.py --rules-json bench/results/netrules-latest.json
	$(PY) bench/trust.py
	$(PY) bench/neighbours.py
	$(PY) bench/scaling.py
	$(PY) bench/api.py
	$(PY) bench/storage_snap.py
	$(PY) bench/storage_io.py

# Mutation testing of the security-critical modules against tests/unit:
# bench/results/mutants-latest.{json,png}. MODULES=ipam,audit restricts it.
mutants: setup
	$(PY) bench/mutants.py --modules '$(MODULES)'

# The API's OpenAPI document, committed: docs/openapi.json (tests/unit/test_openapi.py
# fails when it differs from what the code gives).
openapi: setup
	$(PY) -m popek.api.openapi docs/openapi.json

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Take popek off this host: popek admin reset (PURGE=1: --purge, the data too),
# then the boot unit, the completion scripts and .venv (scripts/uninstall.sh).
.PHONY: uninstall
uninstall:
	@bash scripts/uninstall.sh

clean:
	rm -rf $(VENV) .cache build *.egg-info
