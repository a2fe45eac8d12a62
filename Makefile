# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint migrate venv clean pg-stop

# (Re)create the virtualenv whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# DATABASE_URL if set; else the local server; else a throwaway cluster in .pg/.
define with_database
	server_url="$$(scripts/postgres.sh url)"; \
	export DATABASE_URL="$${DATABASE_URL:-$${server_url%/*}/portal_gateway}";
endef

run: venv
	@$(with_database) \
	LOG_FORMAT="$${LOG_FORMAT:-console}" $(BIN)/portal-gateway demo

test: venv
	PG_ADMIN_URL="$$(scripts/postgres.sh url)" $(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

migrate: venv
	@$(with_database) $(BIN)/portal-gateway migrate

pg-stop:
	scripts/postgres.sh stop

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
