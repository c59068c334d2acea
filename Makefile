# Two commands on a fresh machine:  `make demo`  (set up + run the demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; any other spec pulls several GB of CUDA.
TORCH_SPEC ?= torch==2.13.0
# the fast tier, on every core (pytest-xdist; a file's tests stay in one worker, so its
# module fixtures are built once)
PYTEST_ARGS ?= -m "not slow" -q -n auto --dist loadfile

.PHONY: setup demo test test-all lint clean

$(BIN)/bayesdream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/bayesdream

demo: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/bayesdream demo --dir demo_run
	$(BIN)/bayesdream summary demo_run/results/run.zarr --modality gene --out demo_run/effects.csv

test: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/pytest $(PYTEST_ARGS)

# every tier: the fast one (on every core), then the statistical and end-to-end one in one
# process (its child processes, servers and clusters use the cores already), the slowest shown
test-all: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/pytest -m "not slow" -q -n auto --dist loadfile $(EXTRA_ARGS)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/pytest -m slow -q --durations=25 $(EXTRA_ARGS)

lint: setup
	$(BIN)/ruff check bayesdream_model tasks flows tests benchmarks docs

clean:
	rm -rf demo_run .pytest_cache
