# nodeflow: `make test` runs the suite (the command CI runs), `make lint` the linters.
PYTHON ?= python3
VENV := .venv
DEV := $(VENV)/.installed

.PHONY: test chaos lint bench bench-quick run screenshot clean

# Three unittest processes at once, balanced by measured time (tests/run.py); NODEFLOW_TEST_JOBS=1 for one.
test:
	$(PYTHON) tests/run.py

# The chaos run at full length (tests/chaos.py: 4 nodes, mixed workload, kills, stops and restarts
# for 120 s, then the invariant checker), then the churn tests at full length. make test runs a
# 30-second chaos run and shorter versions of the churn tests. A seed replays a run's choices:
# make chaos CHAOS_ARGS='--seed 12345'.
CHAOS_ARGS ?=
chaos:
	$(PYTHON) tests/chaos.py --seconds 120 $(CHAOS_ARGS)
	NODEFLOW_CHAOS=1 $(PYTHON) -m unittest -v tests.test_serve.SchedulerChurn tests.test_bus.ChaosConsumers \
		tests.test_workflow_cluster tests.test_faults

$(DEV): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(DEV)

lint: $(DEV)
	$(VENV)/bin/ruff check nodeflow.py tests bench examples
	$(VENV)/bin/ruff format --check nodeflow.py
	$(VENV)/bin/mypy

bench: $(DEV)
	$(VENV)/bin/python bench/bench_locks.py
	$(VENV)/bin/python bench/bench_bus.py
	$(VENV)/bin/python bench/bench_serve.py
	$(VENV)/bin/python bench/bench_workflows.py
	$(VENV)/bin/python bench/bench_retention.py
	$(VENV)/bin/python bench/bench_fanout.py

bench-quick: $(DEV)
	$(VENV)/bin/python bench/bench_locks.py --quick
	$(VENV)/bin/python bench/bench_bus.py --quick
	$(VENV)/bin/python bench/bench_serve.py --quick
	$(VENV)/bin/python bench/bench_workflows.py --quick
	$(VENV)/bin/python bench/bench_retention.py --quick
	$(VENV)/bin/python bench/bench_fanout.py --quick

run:
	$(PYTHON) examples/counter.py

# README's picture of the dashboard: a real cluster running examples/order.json, in headless chromium.
screenshot:
	$(PYTHON) examples/screenshot.py examples/dashboard.png

clean:
	rm -rf $(VENV) *.egg-info build .mypy_cache .ruff_cache
