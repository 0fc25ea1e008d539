# Two commands on a fresh machine: `make demo` and `make test`. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup up down demo test test-fast lint format worker bench bench-full clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip uninstall --quiet -y spine 2>/dev/null || true  # the distribution's old name
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Compiles the sources every time (only what changed): the workflow sandbox imports the workflow
# modules afresh for each run, and where PYTHONDONTWRITEBYTECODE is set nothing else writes
# their bytecode, so each run would compile them from source (~20 ms of CPU).
PACKAGES := spine workflows activities guardrails observability client demo bench
setup: $(STAMP)
	$(BIN)/python -m compileall -q $(PACKAGES)

up: setup
	temporal-dev/up

down:
	temporal-dev/down

# Starts the local stack if needed, runs the refund agent on the scripted model (approving its
# one approval automatically, and saying so), prints the result and the run's Web UI link.
demo: up
	source temporal-dev/.env && $(BIN)/spine demo

# The whole suite; every server it needs is started by the tests themselves on free ports.
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

worker: up
	source temporal-dev/.env && $(BIN)/python worker.py

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Quick sizes of every benchmark (~15 min on 2 cores): results, plots and the README table in
# bench/results/quick/. `make bench-full` runs the full sizes (~2 h) into bench/results/.
QUICK := bench/results/quick
bench: $(BENCH_STAMP) setup
	$(BIN)/python -m bench.overhead --quick --out $(QUICK)/overhead.json
	$(BIN)/python -m bench.guards --quick
	$(BIN)/python -m bench.long_runs --quick --out $(QUICK)/long_runs.json
	$(BIN)/python -m bench.long_runs --quick --provider openai --out $(QUICK)/long_runs_openai.json
	$(BIN)/python -m bench.long_runs --quick --provider anthropic --out $(QUICK)/long_runs_anthropic.json
	$(BIN)/python -m bench.recovery --quick --out $(QUICK)/recovery.json
	$(BIN)/python -m bench.peers --quick --out $(QUICK)/peers.json
	$(BIN)/python -m bench.compound --quick --out $(QUICK)/compound.json
	$(BIN)/python -m bench.parallel --quick --out $(QUICK)/parallel.json
	$(BIN)/python -m bench.streaming --quick --out $(QUICK)/streaming.json
	$(BIN)/python -m bench.provider_cpu --quick --out $(QUICK)/provider_cpu.json
	$(BIN)/python -m bench.report --results $(QUICK)

bench-full: $(BENCH_STAMP) setup
	$(BIN)/python -m bench.overhead --out bench/results/overhead.json
	$(BIN)/python -m bench.guards
	$(BIN)/python -m bench.long_runs --out bench/results/long_runs.json
	$(BIN)/python -m bench.long_runs --steps 2000 --provider openai --out bench/results/long_runs_openai.json
	$(BIN)/python -m bench.long_runs --steps 2000 --provider anthropic --out bench/results/long_runs_anthropic.json
	$(BIN)/python -m bench.recovery --out bench/results/recovery.json
	$(BIN)/python -m bench.peers --out bench/results/peers.json
	$(BIN)/python -m bench.compound --out bench/results/compound.json
	$(BIN)/python -m bench.parallel --out bench/results/parallel.json
	$(BIN)/python -m bench.streaming --out bench/results/streaming.json
	$(BIN)/python -m bench.provider_cpu --out bench/results/provider_cpu.json
	$(BIN)/python -m bench.report

clean: down
	rm -rf $(VENV) temporal-dev/.data .spine
