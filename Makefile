# Every target creates its own environment on a fresh clone (torch pinned to the local CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench overhead lint

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench,demo]'
	$(PY) -m pip uninstall -y -q torchvision 2>/dev/null || true
	touch $@

# lmms-eval (about 1.2 GB) only for the tests of the lmms-eval plugin; it pulls the registry's CUDA
# torchvision, which breaks transformers' imports on a CPU machine, so it is removed again
$(VENV)/.eval-installed: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench,demo,eval]'
	$(PY) -m pip uninstall -y -q torchvision 2>/dev/null || true
	touch $@

demo: $(VENV)/.installed  ## every method at keep 1/2, 1/4, 1/8 on the trained toy VLM (offline, CPU, < 5 min)
	$(VENV)/bin/tokprune demo --out demo-results

# TOKPRUNE_REQUIRE_EVAL: the lmms-eval plugin's tests fail (instead of skipping) if lmms-eval is missing
test: $(VENV)/.eval-installed  ## the whole suite (what CI runs)
	TOKPRUNE_REQUIRE_EVAL=1 $(PY) -m pytest -q -n 2

test-fast: $(VENV)/.eval-installed  ## skip the slow end-to-end tests
	TOKPRUNE_REQUIRE_EVAL=1 $(PY) -m pytest -q -n 2 -m "not slow"

bench: $(VENV)/.installed  ## methods vs unpruned on LLaVA-1.5-7B shapes (LLM truncated to 4 layers for a CPU)
	$(VENV)/bin/tokprune bench --model llava-1.5-7b --layers 4 --methods visionzip divprune fastv pdrop \
		--budgets 64 --repeats 2 --max-new-tokens 4 --eager-baseline --out bench-results

overhead: $(VENV)/.installed  ## prefill time of every pre-LLM method vs the ideal pruned prefill
	$(PY) benchmarks/prefill_overhead.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check tokprune patches tests benchmarks examples
	$(VENV)/bin/ruff check tokprune patches tests benchmarks examples
