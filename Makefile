# Everything a fresh machine with only Python needs. `make demo` and `make test` set up .venv
# on first use: torch first, pinned (a bare torch requirement pulls a multi-GB CUDA build),
# then this project in editable mode with its test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,wandb]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m flows.demo $(DEMO_OUT)

test: setup
	bash scripts/test-services.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
