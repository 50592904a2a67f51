# Two commands on a fresh machine with python3 and make: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck check bench clean slurm test-slurm bench-slurm

$(BIN)/watchdog-llm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: $(BIN)/watchdog-llm
	$(BIN)/watchdog-llm demo

test: $(BIN)/watchdog-llm
	$(BIN)/pytest -q

lint: $(BIN)/watchdog-llm
	$(BIN)/ruff check watchdog_llm tests bench
	$(BIN)/ruff format --check watchdog_llm tests bench

typecheck: $(BIN)/watchdog-llm
	$(BIN)/mypy watchdog_llm

check: lint typecheck test

bench: $(BIN)/watchdog-llm
	$(BIN)/python bench/yield_bench.py

# A real one-node Slurm on this machine (root; Debian 12), its end-to-end tests and benchmark.
slurm:
	scripts/slurm-local.sh start

test-slurm: $(BIN)/watchdog-llm slurm
	WATCHDOG_LLM_REQUIRE_SLURM=1 $(BIN)/pytest -q tests/test_slurm_real.py tests/test_slurm_gpus_real.py

bench-slurm: $(BIN)/watchdog-llm slurm
	$(BIN)/python bench/slurm_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
