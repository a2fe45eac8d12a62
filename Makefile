# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint migrate venv clean pg-stop check-dashboards chromium

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

# Debian's Chromium for the browser test of portal links (scripts/chromium.sh;
# a no-op when installed). Where it cannot be installed `make test` goes on and
# that test skips, saying why.
chromium:
	@scripts/chromium.sh >/dev/null || \
		echo "make: Chromium could not be installed (above); the browser test will skip" >&2

test: venv chromium
	PG_ADMIN_URL="$$(scripts/postgres.sh url)" $(BIN)/pytest -n 2

# deploy/Dockerfile built with podman and run for real (tests/test_image.py,
# also part of `make test`): scripts/image.sh installs podman, runc and
# debootstrap with apt when missing and caches the base it makes (README
# "Deploying"). Prints how long each step took and the image's size.
.PHONY: image-smoke
image-smoke: venv
	PG_ADMIN_URL="$$(scripts/postgres.sh url)" $(BIN)/pytest tests/test_image.py -rP

# The Grafana dashboard and alert rules against a real Prometheus (installed
# with apt when missing); also part of `make test`.
check-dashboards: venv
	PG_ADMIN_URL="$$(scripts/postgres.sh url)" $(BIN)/pytest tests/test_dashboards.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Mutation testing of the security-critical modules (scripts/mutation.py, a few
# minutes, not part of `make test`): fails if any keeps over 10 % of its mutants
# alive. The tests it runs need no database (pyproject.toml [tool.mutmut]).
# MUTATION_ARGS passes options, e.g. "ratelimit auth" or "--jobs 1".
.PHONY: mutation
mutation: venv
	$(BIN)/python scripts/mutation.py $(MUTATION_ARGS)

migrate: venv
	@$(with_database) $(BIN)/portal-gateway migrate

pg-stop:
	scripts/postgres.sh stop

# The local stack of deploy/docker-compose.yml (README "Deploying"): needs a
# Docker engine. `make down` keeps the database volume (`... down -v` drops it).
COMPOSE := docker compose -f deploy/docker-compose.yml
.PHONY: up down

up:
	$(COMPOSE) up --build --detach

down:
	$(COMPOSE) down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# The benchmark of SPEC §10 (bench/run.py; README "Performance"): service vs a
# bare aiohttp floor, on loopback, < 10 minutes. BENCH_ARGS passes options,
# e.g. `make bench BENCH_ARGS="--users 1000000"` or "--reps 5".
# wrk (and strace) come from apt via scripts/wrk.sh; py-spy from PyPI into its
# own venv, bench/.venv, so the project's dependencies stay as they are.
.PHONY: bench bench-instr
BENCH_VENV := bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp

$(BENCH_STAMP):
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet 'py-spy>=0.4,<0.5'
	@touch $(BENCH_STAMP)

bench: venv $(BENCH_STAMP)
	@eval "$$(scripts/wrk.sh)" && \
	$(BIN)/python bench/run.py --wrk "$$WRK" --strace "$$STRACE" \
		--py-spy $(BENCH_VENV)/bin/py-spy $(BENCH_ARGS)

# Instructions per request under valgrind's callgrind, service vs floor.
bench-instr: venv
	@eval "$$(scripts/wrk.sh --valgrind)" && $(BIN)/python bench/instr.py $(BENCH_INSTR_ARGS)
