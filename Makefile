# One entry point for newcomers and CI. Each target sets up what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint format bench system-deps agents

# `make run`: the gateway under gunicorn, exactly as in production (see README).
run: $(VENV)/.runtime
	$(BIN)/gunicorn -c gunicorn.conf.py app:app

# `make test`: lint and type-check, then the whole suite (unit, end-to-end, deployment).
test: $(VENV)/.dev system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# `make bench`: the performance comparison in bench/ (needs wrk and taskset).
bench: $(VENV)/.dev
	@command -v wrk >/dev/null || $(call apt_install,wrk)
	$(BIN)/python -m bench.run

# tests/agents runs the real Claude Code and Codex CLIs: the tests npm-install the pinned
# versions into .cache/agents themselves (`make agents` does it ahead of time).
agents: $(VENV)/.dev system-deps
	$(BIN)/python -c "from tests.agents.clis import install_agents; install_agents()"

# The end-to-end tier starts a real redis-server and a real Prometheus (tests/monitoring,
# which also runs promtool); install them when missing.
system-deps:
	@command -v redis-server >/dev/null || $(call apt_install,redis-server)
	@command -v npm >/dev/null || $(call apt_install,nodejs npm)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || $(call apt_install,prometheus)

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
define apt_install
{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(1) >/dev/null; }
endef
