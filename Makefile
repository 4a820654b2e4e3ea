# nodeflow: `make test` runs the suite (the command CI runs), `make lint` the linters.
PYTHON ?= python3
VENV := .venv
DEV := $(VENV)/.installed

.PHONY: test chaos lint bench bench-quick run screenshot clean

# Two unittest processes at once, balanced by measured time (tests/run.py); NODEFLOW_TEST_JOBS=1 for one.
test:
	$(PYTHON) tests/run.py

# The churn tests at full length (make test runs shorter versions of the same tests).
chaos:
	NODEFLOW_CHAOS=1 $(PYTHON) -m unittest -v tests.test_serve.SchedulerChurn tests.test_bus.ChaosConsumers \
		tests.test_workflow_cluster

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

bench-quick: $(DEV)
	$(VENV)/bin/python bench/bench_locks.py --quick
	$(VENV)/bin/python bench/bench_bus.py --quick
	$(VENV)/bin/python bench/bench_serve.py --quick
	$(VENV)/bin/python bench/bench_workflows.py --quick

run:
	$(PYTHON) examples/counter.py

# README's picture of the dashboard: a real cluster running examples/order.json, in headless chromium.
screenshot:
	$(PYTHON) examples/screenshot.py examples/dashboard.png

clean:
	rm -rf $(VENV) *.egg-info build .mypy_cache .ruff_cache
