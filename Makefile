# Two commands: `make run` starts the relay, `make test` runs every test.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3

.PHONY: run test lint format bench-smoke clean

$(VENV)/.runtime: requirements.txt
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(PYTHON) -m relay.serve.launch

test: $(VENV)/.dev
	tests/install-system-deps.sh
	$(MAKE) lint
	$(PYTHON) -m pytest
	$(MAKE) bench-smoke

bench-smoke: $(VENV)/.dev
	$(PYTHON) -m bench.run --smoke

lint: $(VENV)/.dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

format: $(VENV)/.dev
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:
	rm -rf $(VENV)
